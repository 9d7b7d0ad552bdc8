"""Chapter 02: the unlearning losses on hand-checkable batches, the loop, the metrics, the stress tests."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from companion import data, unlearning as U
from companion.tokenizer import encode_chat


@pytest.fixture(scope="module")
def qa():
    return U.make_qa_data(data.make_world(n_people=300, seed=3), n_people=40, n_holdout=20, seed=0)


def _batch(tok, facts, pad=None):
    return U.as_batch(U.qa_sequences(tok, facts, phrasings=(0,)), tok.pad_token_id if pad is None else pad)


def _manual_log_probs(model, tok, question, answer):
    """log p(answer | question) by hand: one unpadded sequence, sum over the answer's tokens only."""
    ids, labels = U.encode_qa(tok, question, answer)
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    lp = torch.log_softmax(logits, -1)
    start = sum(1 for x in labels if x == -100)
    return sum(float(lp[t - 1, ids[t]]) for t in range(start, len(ids))), len(ids) - start


# --- data -----------------------------------------------------------------------------------------


def test_qa_data_splits_are_nested_and_disjoint(qa):
    f1, f5, f10 = (set(qa.forget_people(s)) for s in ("forget01", "forget05", "forget10"))
    assert f1 <= f5 <= f10 and len(f1) == 1 and len(f5) == 2 and len(f10) == 4
    assert not set(qa.people) & set(qa.holdout)
    assert set(qa.retain_people("forget10")) == set(qa.people) - f10
    fact = qa.facts_of([qa.people[0]])[0]
    assert fact.value in fact.options and fact.value not in fact.perturbed(4)
    assert len(set(fact.perturbed(4))) == 4 and fact.perturbed(4) == fact.perturbed(4)


def test_encode_qa_masks_the_prompt_and_matches_the_chat_format(small_tokenizer, qa):
    fact = qa.facts_of([qa.people[0]])[0]
    ids, labels = U.encode_qa(small_tokenizer, fact.question(), fact.answer())
    messages = [{"role": "user", "content": fact.question()}, {"role": "assistant", "content": fact.answer()}]
    assert ids == encode_chat(small_tokenizer, messages, add_generation_prompt=False)
    prompt = encode_chat(small_tokenizer, messages[:1], add_generation_prompt=True)
    assert labels[: len(prompt)] == [-100] * len(prompt) and labels[len(prompt):] == ids[len(prompt):]


# --- the losses, by hand --------------------------------------------------------------------------


def test_sequence_log_probs_count_only_answer_tokens_and_ignore_padding(tiny_lm, qa):
    model, tok = tiny_lm
    facts = qa.facts_of(qa.people[:2])[:3]
    log_p, n = U.sequence_log_probs(model, _batch(tok, facts))
    for i, f in enumerate(facts):
        manual, count = _manual_log_probs(model, tok, f.question(), f.answer())
        assert int(n[i]) == count
        assert float(log_p[i]) == pytest.approx(manual, abs=1e-4)
    # another pad id (or extra padding) changes nothing
    log_p2, _ = U.sequence_log_probs(model, _batch(tok, facts, pad=tok.eos_token_id))
    assert torch.allclose(log_p, log_p2, atol=1e-5)


def test_ga_and_graddiff_are_signed_nll(tiny_lm, qa):
    model, tok = tiny_lm
    f, r = _batch(tok, qa.facts_of(qa.people[:1])), _batch(tok, qa.facts_of(qa.people[5:6]))
    log_p, n = U.sequence_log_probs(model, f)
    assert float(U.ga_loss(model, f)) == pytest.approx(float(log_p.sum() / n.sum()), abs=1e-5)
    assert float(U.graddiff_loss(model, f, r, alpha=2.0)) == pytest.approx(
        float(U.ga_loss(model, f) + 2 * U.nll_loss(model, r)), abs=1e-5)


def test_npo_reduces_to_its_formula(tiny_lm, qa):
    model, tok = tiny_lm
    f = _batch(tok, qa.facts_of(qa.people[:1]))
    beta = 0.1
    # at the reference itself the ratio is 1: L = (2/beta) log 2
    assert float(U.npo_loss(model, model, f, beta=beta)) == pytest.approx(2 / beta * math.log(2), abs=1e-4)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    log_p, _ = U.sequence_log_probs(model, f)
    log_ref, _ = U.sequence_log_probs(other, f)
    expected = -(2 / beta) * F.logsigmoid(-beta * (log_p - log_ref)).mean()
    assert float(U.npo_loss(model, other, f, beta=beta)) == pytest.approx(float(expected), abs=1e-4)
    # small beta: NPO's gradient tends to GA's (Zhang et al. 2024, Sec. 4)
    params = [p for p in model.parameters() if p.requires_grad]
    g_npo = torch.autograd.grad(U.npo_loss(model, other, f, beta=1e-4), params)
    g_ga = torch.autograd.grad(U.sequence_log_probs(model, f)[0].mean(), params)  # GA: lower log p
    cos = F.cosine_similarity(torch.cat([g.flatten() for g in g_npo]), torch.cat([g.flatten() for g in g_ga]), 0)
    assert float(cos) > 0.999


def test_npo_retain_term_has_the_forget_terms_normalisation(tiny_lm, qa):
    model, tok = tiny_lm
    # forget and retain: one answer each, of the same number of tokens (same attribute, names of one length)
    facts = [f for f in qa.facts_of(qa.people) if f.attribute == "pet"]
    lengths = {}
    for f in facts:
        lengths.setdefault(len(U.encode_qa(tok, f.question(), f.answer())[0])
                           - len(U.encode_qa(tok, f.question(), "x")[0]), []).append(f)
    same = next(group for group in lengths.values() if len(group) >= 2)
    f, r = _batch(tok, same[:1]), _batch(tok, same[1:2])
    log_r, n_r = U.sequence_log_probs(model, r)
    assert int(n_r[0]) == int(U.sequence_log_probs(model, f)[1][0])
    at_ref = U.npo_loss(model, model, f, r, beta=0.1)
    assert float(at_ref) == pytest.approx(2 / 0.1 * math.log(2) - float(log_r[0]), abs=1e-4)  # summed NLL
    token = U.npo_loss(model, model, f, r, beta=0.1, retain_norm="token")  # open-unlearning's variant
    assert float(token) == pytest.approx(2 / 0.1 * math.log(2) + float(U.nll_loss(model, r)), abs=1e-4)
    # at pi_theta = pi_ref, NPO-RT's gradient is GradDiff's times the answer length: the same AdamW step
    params = [p for p in model.parameters() if p.requires_grad]
    flat = lambda loss: torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])  # noqa: E731
    g_npo, g_gd = flat(U.npo_loss(model, model, f, r, beta=0.1)), flat(U.graddiff_loss(model, f, r))
    assert torch.allclose(g_npo, int(n_r[0]) * g_gd, rtol=1e-3, atol=1e-6)
    g_tok = flat(U.npo_loss(model, model, f, r, beta=0.1, retain_norm="token"))
    assert float(F.cosine_similarity(g_tok, g_gd, 0)) < 0.999  # the per-token variant tilts towards forgetting
    with pytest.raises(ValueError, match="retain_norm"):
        U.npo_loss(model, model, f, r, retain_norm="batch")


def test_simnpo_formula(tiny_lm, qa):
    model, tok = tiny_lm
    f = _batch(tok, qa.facts_of(qa.people[:1]))
    log_p, n = U.sequence_log_probs(model, f)
    expected = -(2 / 4.5) * F.logsigmoid(-(4.5 / n) * log_p - 0.5).mean()
    assert float(U.simnpo_loss(model, f, beta=4.5, gamma=0.5)) == pytest.approx(float(expected), abs=1e-5)


def test_kl_is_zero_against_itself_and_masks_padding(tiny_lm, qa):
    model, tok = tiny_lm
    r = _batch(tok, qa.facts_of(qa.people[3:5]))
    assert float(U.kl_retain_loss(model, model, r)) == pytest.approx(0.0, abs=1e-6)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.get_input_embeddings().weight.add_(0.1)
    one = [U.qa_sequences(tok, qa.facts_of(qa.people[3:4]), phrasings=(0,))[0]]
    long = U.qa_sequences(tok, [max(qa.facts_of(qa.people), key=lambda f: len(f.question()))], phrasings=(0,))
    alone = U.kl_retain_loss(model, other, U.as_batch(one, tok.pad_token_id))
    padded = U.as_batch(one + long, tok.pad_token_id)
    # the first row's KL does not depend on the padding a longer neighbour forces on it
    _, mask = U._targets(padded)
    assert mask[0].sum() == sum(1 for x in one[0][1][1:] if x != -100)
    assert float(alone) > 0


def test_rmu_terms(tiny_lm, qa):
    model, tok = tiny_lm
    f, r = _batch(tok, qa.facts_of(qa.people[:1])), _batch(tok, qa.facts_of(qa.people[5:6]))
    h = U.hidden_states(model, f, 0)
    control = torch.zeros(h.shape[-1])
    loss = U.rmu_loss(model, model, f, r, control, layer=0, alpha=1.0)  # retain term is 0 against itself
    _, mask = U._targets(f)
    expected = ((h[:, 1:] ** 2).mean(-1) * mask).sum() / mask.sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


# --- the loop -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", U.METHODS + U.CONTROLS)
def test_unlearn_runs_every_method_and_logs_passes(tiny_lm, qa, method):
    model, tok = tiny_lm
    model = copy.deepcopy(model)
    forget = U.qa_sequences(tok, qa.facts_of(qa.forget_people("forget10")), phrasings=(0,))
    retain = U.qa_sequences(tok, qa.facts_of(qa.retain_people("forget10")[:4]), phrasings=(0,))
    _, log = U.unlearn(model, forget, retain, method=method, steps=3, lr=1e-3, batch_size=4,
                       evaluate=lambda m: {"ok": 1}, eval_every=2, pad_id=tok.pad_token_id)
    assert len(log.losses) == 3 and all(math.isfinite(x) for x in log.losses)
    assert sorted(log.evals) == [0, 2, 3]
    assert log.passes == (U.PASSES[method][0] * 4 * 3, U.PASSES[method][1] * 4 * 3)
    assert log.passes[0] == 2 * 4 * 3  # equal budgets: every method trains on 2 x batch_size per step


def test_one_term_methods_draw_twice_the_batch(tiny_lm, qa, monkeypatch):
    model, tok = tiny_lm
    forget = U.qa_sequences(tok, qa.facts_of(qa.forget_people("forget10")), phrasings=(0,))
    retain = U.qa_sequences(tok, qa.facts_of(qa.retain_people("forget10")[:4]), phrasings=(0,))
    seen = []
    real = U.nll_loss
    monkeypatch.setattr(U, "nll_loss", lambda m, b: seen.append(len(b["input_ids"])) or real(m, b))
    U.unlearn(copy.deepcopy(model), forget, retain, "retain_only", steps=2, lr=1e-3, batch_size=4,
              pad_id=tok.pad_token_id)
    assert seen == [8, 8]
    before = copy.deepcopy(model)
    U.unlearn(model := copy.deepcopy(model), forget, retain, "retain_only", steps=2, lr=1e-3, batch_size=4,
              pad_id=tok.pad_token_id)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))


def test_gradient_ascent_raises_the_forget_loss(tiny_lm, qa):
    model, tok = tiny_lm
    model = copy.deepcopy(model)
    forget = U.qa_sequences(tok, qa.facts_of(qa.forget_people("forget10")), phrasings=(0,))
    retain = U.qa_sequences(tok, qa.facts_of(qa.retain_people("forget10")[:4]), phrasings=(0,))
    before = float(U.nll_loss(model, U.as_batch(forget, tok.pad_token_id)))
    U.unlearn(model, forget, retain, "ga", steps=5, lr=1e-2, batch_size=8, pad_id=tok.pad_token_id)
    assert float(U.nll_loss(model, U.as_batch(forget, tok.pad_token_id))) > before + 0.5


def test_unlearn_rejects_empty_overlapping_and_unknown(tiny_lm, qa):
    model, tok = tiny_lm
    seqs = U.qa_sequences(tok, qa.facts_of(qa.people[:2]), phrasings=(0,))
    with pytest.raises(ValueError, match="forget must not be empty"):
        U.unlearn(model, [], seqs, "ga")
    with pytest.raises(ValueError, match="must not overlap"):
        U.unlearn(model, seqs[:3], seqs[2:], "ga")
    with pytest.raises(ValueError, match="method"):
        U.unlearn(model, seqs[:3], seqs[3:], "forget-harder")


# --- the metrics ----------------------------------------------------------------------------------


def test_forget_quality_is_one_for_the_same_distribution_and_tiny_for_a_shifted_one():
    g = torch.Generator().manual_seed(0)
    oracle = torch.rand(100, generator=g) * 0.5 + 0.5
    assert U.forget_quality(oracle, oracle) == pytest.approx(1.0)
    assert U.forget_quality(oracle * 0.2, oracle) < 1e-10
    with pytest.raises(ValueError, match="oracle_ratios"):
        U.forget_quality(oracle, [1.0])


def test_truth_ratios_and_membership_scores_on_both_architectures(tiny_lm, qa):
    model, tok = tiny_lm
    facts = qa.facts_of(qa.people[:2])
    ratios = U.truth_ratios(model, tok, facts)
    assert ratios.shape == (len(facts),) and bool((ratios > 0).all())
    scores = U.membership_scores(model, tok, facts)
    assert set(scores) == {"loss", "min_k", "min_k_plus_plus"} and all(len(v) == len(facts) for v in scores.values())
    report = U.evaluate_unlearning(model, tok, {"forget": facts, "retain": qa.facts_of(qa.people[5:6]),
                                                "holdout": qa.facts_of(qa.holdout[:2])}, oracle=model)
    assert report["forget_quality"] == pytest.approx(1.0) and report["privleak"]["loss"] == pytest.approx(0.0)


def test_privleak_interval_is_paired_and_covers_the_estimate(tiny_lm, qa):
    model, tok = tiny_lm
    splits = {"forget": qa.facts_of(qa.people[:4]), "retain": qa.facts_of(qa.people[5:6]),
              "holdout": qa.facts_of(qa.holdout[:4])}
    report = U.evaluate_unlearning(model, tok, splits)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.get_input_embeddings().weight.add_(0.05 * torch.randn_like(other.get_input_embeddings().weight))
    oracle = U.evaluate_unlearning(other, tok, splits)
    same = U.privleak_interval(report, report, "loss", n_boot=200)
    assert same["privleak"] == (0.0, 0.0)  # the same model on the same draw: no leak difference at all
    box = U.privleak_interval(report, oracle, "loss", n_boot=500)
    lo, hi = box["auc"]
    assert lo <= report["mia_auc"]["loss"] <= hi and box["privleak"][0] <= box["privleak"][1]
    with pytest.raises(TypeError, match="oracle_report"):
        U.privleak_interval(report, {"mia_auc": {}})
    with pytest.raises(ValueError, match="score"):
        U.privleak_interval(report, oracle, "zlib")
    with pytest.raises(ValueError, match="n_boot"):
        U.privleak_interval(report, oracle, n_boot=5)


def test_answer_judges(qa):
    fact = U.Fact("Ada Lane", "pet", "cat", data.PETS)
    assert U.answer_correct(fact, "The pet of Ada Lane is cat.")
    assert not U.answer_correct(fact, "The pet of Ada Lane is dog.")
    assert not U.answer_correct(fact, "The pet of Ada Lane is catfish.")
    assert U.well_formed(fact, "The pet of Ada Lane is dog.")
    assert not U.well_formed(fact, "The pet pet pet of of")
    # MUSE's numbers: AUC_MUSE = 1 - ours; a model that still remembers (ours 1.0) vs an oracle at 0.5: -100%
    assert U.privleak(0.5, 0.5) == 0 and U.privleak(1.0, 0.5) == -1.0 and U.privleak(0.25, 0.5) == 0.5


# --- the stress tests -----------------------------------------------------------------------------


def test_quantize_weights_puts_each_row_on_a_small_grid(tiny_lm):
    from companion.pruning import block_layers, decoder_blocks, weight_matrix

    model, _ = tiny_lm
    model = copy.deepcopy(model)
    U.quantize_weights(model, bits=4)
    layer = next(iter(block_layers(decoder_blocks(model)[0]).values()))
    row = weight_matrix(layer)[0]
    assert len(torch.unique(row)) <= 15  # symmetric 4-bit: codes -7..7


def test_relearn_lowers_the_loss(tiny_lm, qa):
    model, tok = tiny_lm
    model = copy.deepcopy(model)
    seqs = U.qa_sequences(tok, qa.facts_of(qa.people[:2]), phrasings=(0,))
    losses = U.relearn(model, seqs, steps=8, lr=1e-2, batch_size=8, pad_id=tok.pad_token_id)
    assert losses[-1] < losses[0]


# --- the zoo recipes -------------------------------------------------------------------------------


def test_qa_recipe_and_its_oracle_bundle(monkeypatch):
    from companion import zoo

    monkeypatch.setitem(zoo.RECIPES, "test-llama", zoo.LMRecipe(
        architecture="llama", hidden=32, layers=2, heads=2, intermediate=64, context=128, steps=2, batch_size=8,
        bio_per_batch=4))
    monkeypatch.setitem(zoo.RECIPES, "test-qa", U.QARecipe(base="test-llama", steps=3, batch_size=8, n_people=20,
                                                         n_holdout=5))
    monkeypatch.setitem(zoo.RECIPES, "test-qa-oracles", U.QARecipe(base="test-llama", steps=3, batch_size=8,
                                                                 n_people=20, n_holdout=5,
                                                                 without=("forget01", "forget10")))
    qa_entry, oracles = zoo.load("test-qa"), zoo.load("test-qa-oracles")
    assert len(qa_entry.card["losses"]) == 3 and set(oracles.card["seconds_per_model"]) == {"forget01", "forget10"}
    assert oracles.model["forget10"].config.trained_context == 128
    a, b = oracles.model["forget01"].state_dict(), oracles.model["forget10"].state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)  # different data, different models
    with pytest.raises(ValueError, match="split"):
        oracles.model["forget05"]
    with pytest.raises(ValueError, match="without must be"):
        U.QARecipe(without=("forget99",))
