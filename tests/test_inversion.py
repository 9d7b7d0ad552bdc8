"""Tests of companion.inversion: output wrappers, the three image attacks, the logit-subspace probes and
the Secret Sharer's exposure and extraction (LM functions on both architectures)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from companion import inversion as inv


def _classifier(seed: int = 0, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).eval()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 64, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Output wrappers
# ---------------------------------------------------------------------------------------------

WRAPPERS = {
    "full": lambda m: inv.ProbabilityAPI(m),
    "temperature": lambda m: inv.Temperature(m, 3.0),
    "top1": lambda m: inv.TopK(m, 1),
    "top3": lambda m: inv.TopK(m, 3),
    "label": lambda m: inv.LabelOnly(m),
    "noise0": lambda m: inv.Noisy(m, 0.0),
}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), name=st.sampled_from(sorted(WRAPPERS)))
def test_wrappers_preserve_the_argmax(seed, name):
    model = _classifier(seed % 7)
    x = _images(16, seed)
    api = WRAPPERS[name](model)
    with torch.no_grad():
        expected = model(x).argmax(1)
        assert torch.equal(api(x).argmax(1), expected)
        assert torch.equal(api.predict(x), expected)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), decimals=st.integers(0, 4))
def test_rounding_keeps_the_true_argmax_among_the_largest_released(seed, decimals):
    model = _classifier(seed % 7)
    x = _images(16, seed)
    with torch.no_grad():
        released = inv.Rounded(model, decimals)(x)
        true = model(x).argmax(1)
    top = released.max(1).values
    assert torch.equal(released.gather(1, true[:, None]).squeeze(1), top)  # a tie at most, never below
    scaled = released * 10 ** decimals
    assert torch.allclose(scaled, scaled.round(), atol=1e-3)


def test_topk_releases_exactly_k_entries_and_counts_queries():
    api = inv.TopK(_classifier(), 3)
    with torch.no_grad():
        released = api(_images(5))
    assert ((released > 0).sum(1) == 3).all()
    assert api.queries == 5


def test_noise_is_fresh_per_query_but_seeded():
    model, x = _classifier(), _images(4)
    a, b = inv.Noisy(model, 1.0, seed=3), inv.Noisy(model, 1.0, seed=3)
    with torch.no_grad():
        first, second = a(x), a(x)
        assert not torch.allclose(first, second)
        assert torch.allclose(first, b(x))


def test_rounding_and_labels_have_zero_gradient():
    model, x = _classifier(), _images(3).requires_grad_(True)
    for api in (inv.Rounded(model, 2), inv.LabelOnly(model)):
        out = api(x)[:, 0].sum()
        grad = torch.autograd.grad(out, x, allow_unused=True)[0] if out.requires_grad else None
        assert grad is None or float(grad.abs().max()) == 0


def test_utility_counts_and_brier():
    model = _classifier()
    x = _images(20)
    with torch.no_grad():
        y = model(x).argmax(1)
    full = inv.api_utility(inv.ProbabilityAPI(model), x, y)
    label = inv.api_utility(inv.LabelOnly(model), x, y)
    assert full["correct"] == label["correct"] == 20 and label["brier"] == 0.0 < full["brier"]


def test_bad_wrapper_arguments_name_the_argument():
    model = _classifier()
    with pytest.raises(ValueError, match="k must be <= 10"):
        inv.TopK(model, 11)
    with pytest.raises(ValueError, match="decimals must be >= 0"):
        inv.Rounded(model, -1)
    with pytest.raises(ValueError, match="std"):
        inv.Noisy(model, -1.0)
    with pytest.raises(ValueError, match="target_class must be <= 9"):
        inv.mi_face(model, 10, steps=1)
    with pytest.raises(ValueError, match="target_class"):
        inv.nes_inversion(inv.ProbabilityAPI(model), torch.tensor([0, 12]), queries=40)
    with pytest.raises(ValueError, match="truncation"):
        inv.InversionNet(10, truncation=11)


# ---------------------------------------------------------------------------------------------
# The image attacks
# ---------------------------------------------------------------------------------------------


def test_mi_face_raises_the_target_probability_and_the_prior_smooths():
    model = _classifier(1)
    classes = torch.arange(10)
    start = _images(10, 1)
    plain = inv.mi_face(model, classes, steps=60, lr=0.1, init=start)
    smooth = inv.mi_face(model, classes, steps=60, lr=0.1, init=start, prior="tv", tv_weight=0.05)
    with torch.no_grad():
        before = torch.softmax(model(start), 1)[torch.arange(10), classes]
        after = torch.softmax(model(plain.images), 1)[torch.arange(10), classes]
    assert (after > before).all()
    assert plain.images.min() >= 0 and plain.images.max() <= 1
    assert inv.total_variation(smooth.images).mean() < inv.total_variation(plain.images).mean()
    assert plain.forward == plain.backward == 60


def test_nes_gradient_correlates_with_the_true_gradient_on_a_smooth_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 10)).eval()  # log-softmax of a linear map: smooth
    x, classes = _images(6, 2), torch.arange(6)
    xg = x.clone().requires_grad_(True)
    (true,) = torch.autograd.grad(torch.log_softmax(model(xg), 1)[torch.arange(6), classes].sum(), xg)
    estimate = inv.nes_gradient(inv.ProbabilityAPI(model), x, classes, samples=400, sigma=0.01,
                                generator=torch.Generator().manual_seed(0))
    assert nn.functional.cosine_similarity(estimate, true, dim=1).min() > 0.8


def test_nes_counts_its_queries_and_stalls_behind_rounding():
    model = _classifier(2)
    api = inv.ProbabilityAPI(model)
    result = inv.nes_inversion(api, torch.arange(4), queries=400, samples=10)
    assert api.queries == 4 * 400 == 4 * result.forward
    stalled = inv.nes_inversion(inv.Rounded(model, 0), torch.arange(4), queries=400, samples=10)
    assert torch.equal(stalled.images, torch.full((4, 64), 0.5))


def test_inverter_learns_and_truncation_matches_topk():
    model = _classifier(3)
    x = _images(200, 3)
    net, losses = inv.train_inverter(inv.ProbabilityAPI(model), x, epochs=30, hidden=32)
    assert losses[-1] < losses[0]
    truncated = inv.InversionNet(10, 8, truncation=2)
    with torch.no_grad():
        probs = torch.softmax(model(x[:5]), 1)
        assert torch.allclose(truncated.encode(probs), truncated.encode(inv.TopK(model, 2)(x[:5])))
    assert inv.invert(net, inv.ProbabilityAPI(model), x[:5]).shape == (5, 64)


def test_nearest_distance_and_recognised():
    ref = _images(20, 4)
    labels = torch.arange(20) % 10
    assert torch.allclose(inv.nearest_distance(ref[:10], labels[:10], ref, labels), torch.zeros(10))
    model = _classifier()
    with torch.no_grad():
        pred = model(ref).argmax(1)
    assert inv.recognised(model, ref, pred).all()
    with pytest.raises(ValueError, match="y_ref"):
        inv.nearest_distance(ref[:2], torch.tensor([0, 1]), ref[:3], torch.tensor([2, 2, 2]))


# ---------------------------------------------------------------------------------------------
# Logits and the hidden size (both architectures)
# ---------------------------------------------------------------------------------------------


def _prompts(n: int) -> list[str]:
    words = "alpha beta gamma delta city lives born works pet food blue red green".split()
    g = torch.Generator().manual_seed(0)
    return [" ".join(words[i] for i in torch.randint(0, len(words), (int(k),), generator=g))
            for k in torch.randint(2, 9, (n,), generator=g)]


def test_logit_rank_is_the_hidden_size(tiny_lm):
    model, tok = tiny_lm
    hidden = model.get_output_embeddings().weight.shape[1]
    logits = inv.last_logits(model, tok, _prompts(3 * hidden))
    rank = inv.hidden_size_estimate(inv.singular_values(logits))
    # GPT-2's final LayerNorm centres h; with its bias still 0 (untrained) one direction is lost
    assert rank == hidden if "llama" in type(model).__name__.lower() else rank in (hidden - 1, hidden)
    assert inv.hidden_size_estimate(inv.singular_values(logits.log_softmax(-1))) == rank + 1


def test_last_logits_do_not_depend_on_the_batch(tiny_lm):
    model, tok = tiny_lm
    prompts = _prompts(6)
    batched = inv.last_logits(model, tok, prompts, batch_size=6)
    single = torch.cat([inv.last_logits(model, tok, [p]) for p in prompts])
    assert torch.allclose(batched, single, atol=1e-4)


def test_recover_logits_from_top_k_and_bias(tiny_lm):
    model, tok = tiny_lm
    api = inv.LogprobAPI(model, tok, top_k=5)
    prompt = _prompts(1)[0]
    recovered = inv.recover_logits(api, prompt)
    exact = inv.last_logits(model, tok, [prompt])[0]
    exact = exact - exact.max()
    assert torch.allclose(recovered, exact, atol=1e-4)
    vocab = model.get_output_embeddings().weight.shape[0]
    assert api.queries == 1 + math.ceil((vocab - 1) / 4)
    with pytest.raises(ValueError, match="top_k"):
        inv.recover_logits(inv.LogprobAPI(model, tok, top_k=1), prompt)


def test_prompts_beyond_the_trained_context_are_refused(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(ValueError, match="trained context"):
        inv.last_logits(model, tok, ["word " * 200])


def test_hidden_size_estimate_bad_values():
    with pytest.raises(ValueError, match="values"):
        inv.hidden_size_estimate(torch.tensor([1.0, -1.0]))
    assert inv.hidden_size_estimate(torch.tensor([5.0, 1.0, 1e-9])) == 2


# ---------------------------------------------------------------------------------------------
# Canaries, exposure, extraction
# ---------------------------------------------------------------------------------------------


def test_exposure_is_log2_of_the_candidate_count_for_a_top_ranked_canary():
    refs = torch.linspace(-30, -20, 127)
    assert inv.exposure(-1.0, refs) == pytest.approx(math.log2(128))
    assert inv.exposure(-100.0, refs) == pytest.approx(0.0)
    assert inv.exposure(float(refs.max()), refs) == pytest.approx(math.log2(128) - 1)  # a tie goes to R
    assert inv.exposure_extrapolated(-1.0, torch.randn(500, generator=torch.Generator().manual_seed(0)) - 25) \
        > math.log2(501)


def test_plant_canaries_levels_and_owners():
    owners = [f"Person {i}" for i in range(12)]
    canaries = inv.plant_canaries(owners, repeats=(0, 2, 5), per_level=4, digits=4)
    assert [c.repeats for c in canaries] == [0] * 4 + [2] * 4 + [5] * 4
    assert len({inv.canary_prefix(c) for c in canaries}) == 12
    assert all(len(c.secret.split()) == 4 for c in canaries)
    assert inv.canary_prefix(canaries[0]) == "The vault code of Person 0 is"
    with pytest.raises(ValueError, match="owners"):
        inv.plant_canaries(owners[:5], repeats=(0, 1), per_level=4)


def test_vault_recipe_validates():
    with pytest.raises(ValueError, match="bio_per_batch"):
        inv.VaultRecipe(bio_per_batch=40)
    with pytest.raises(TypeError, match="repeats"):
        inv.VaultRecipe(repeats=[1, 2])


def _one_token_symbols(tok, n: int = 4) -> str:
    found = [s for s in "abcdefghijklmnopqrstuvwxyz0123456789"
             if len(tok(" " + s, add_special_tokens=False)["input_ids"]) == 1]
    assert len(found) >= n
    return "".join(found[:n])


def test_secret_log_probs_sum_the_secret_tokens(tiny_lm):
    from companion.metrics import token_log_probs

    model, tok = tiny_lm
    alphabet = _one_token_symbols(tok)
    secret = " ".join(alphabet[:3])
    got = inv.secret_log_probs(model, tok, ["The code is"], [secret])
    stats = token_log_probs(model, tok, [f"The code is {secret}"])[0]["log_prob"]
    assert torch.allclose(got, stats[-3:].sum()[None], atol=1e-5)


def test_extract_secret_top_k_at_least_beam_equals_the_full_search(tiny_lm):
    model, tok = tiny_lm
    alphabet = _one_token_symbols(tok)
    prefixes = ["The vault code of Ada is", "My pin is"]
    full = inv.extract_secret(model, tok, prefixes, digits=3, beam=3, alphabet=alphabet)
    shown = inv.extract_secret(model, tok, prefixes, digits=3, beam=3, top_k=3, alphabet=alphabet)
    assert [[s for s, _ in r] for r in full] == [[s for s, _ in r] for r in shown]
    for r in full:
        assert len(r) == 3 and all(a[1] >= b[1] for a, b in zip(r, r[1:]))
    best = full[0][0]
    score = inv.secret_log_probs(model, tok, [prefixes[0]], [best[0]])
    assert float(score) == pytest.approx(best[1], abs=1e-4)


def test_extract_secret_finds_a_memorised_secret(tiny_lm):
    model, tok = tiny_lm
    alphabet = _one_token_symbols(tok)
    secret = " ".join(alphabet[i] for i in (2, 0, 3))
    ids = torch.tensor([tok(f"The code is {secret}")["input_ids"]])
    trained = type(model)(model.config)
    trained.load_state_dict(model.state_dict())
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-2)
    trained.train()
    for _ in range(60):
        loss = trained(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained.eval()
    found = inv.extract_secret(trained, tok, ["The code is"], digits=3, beam=2, alphabet=alphabet)
    assert found[0][0][0] == secret


def test_extract_secret_via_api_scores_symbols_renormalised_after_the_bias(tiny_lm):
    model, tok = tiny_lm
    alphabet = _one_token_symbols(tok)[:5]
    prefixes = ["The vault code of Ada is", "My pin is"]
    api = inv.LogprobAPI(model, tok, top_k=3)
    found = inv.extract_secret_via_api(api, prefixes, digits=3, beam=2, alphabet=alphabet)
    assert api.queries == len(prefixes) * (1 + 2 * 2)
    symbols = inv._digit_tokens(tok, alphabet)
    for prefix, cands in zip(prefixes, found):
        assert len(cands) == 2 and cands[0][1] >= cands[1][1]
        secret, score = cands[0]
        expected, text = 0.0, prefix
        for symbol in secret.split():  # the constrained log p of each symbol, computed directly
            logits = inv.last_logits(model, tok, [text])[0]
            expected += float(torch.log_softmax(logits[symbols], -1)[alphabet.index(symbol)])
            text += " " + symbol
        assert score == pytest.approx(expected, abs=1e-4)
    with pytest.raises(TypeError, match="api must be a LogprobAPI"):
        inv.extract_secret_via_api(model, prefixes)


def test_extract_secret_refuses_multi_token_symbols(tiny_lm):
    model, tok = tiny_lm
    bad = [s for s in "0123456789" if len(tok(" " + s, add_special_tokens=False)["input_ids"]) > 1]
    if not bad:
        pytest.skip("this tokenizer keeps every digit whole")
    with pytest.raises(ValueError, match="alphabet"):
        inv.extract_secret(model, tok, ["x is"], alphabet=bad[0])
