import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from companion import metrics


def test_roc_matches_sklearn_with_ties():
    labels = [1, 0, 1, 1, 0, 0, 1, 0]
    scores = [0.9, 0.9, 0.8, 0.5, 0.5, 0.1, 0.1, 0.0]
    fpr, tpr, thr = metrics.roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert metrics.auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(-5, 5)), min_size=2, max_size=60))
def test_auc_equals_sklearn_on_random_tied_scores(pairs):
    labels = [int(a) for a, _ in pairs]
    scores = [float(b) for _, b in pairs]
    if len(set(labels)) < 2:
        return
    assert metrics.auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores))
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    assert fpr[-1] == 1 and tpr[-1] == 1


def test_tpr_at_fpr_hand_case():
    labels = np.r_[np.ones(4), np.zeros(10)]
    scores = np.r_[[10, 9, 2, 1], [8, 0, 0, 0, 0, 0, 0, 0, 0, 0]]
    # no false positive above 8: 2 of 4 members; one false positive (FPR 0.1) lets all 4 through
    assert metrics.tpr_at_fpr(labels, scores, 0.05) == 0.5
    assert metrics.tpr_at_fpr(labels, scores, 0.1) == 1.0
    assert metrics.advantage(labels, scores) == pytest.approx(0.9)


def test_summary_hand_case_counts_agree_with_tpr_at_fpr():
    # the hand case above: 4 members, 10 non-members
    labels = np.r_[np.ones(4), np.zeros(10)]
    scores = np.r_[[10, 9, 2, 1], [8, 0, 0, 0, 0, 0, 0, 0, 0, 0]]
    result = metrics.summary(labels, scores, fprs=(0.05, 0.1, 0.5))
    assert (result.positives, result.negatives) == (4, 10)
    assert result.auc == metrics.auc(labels, scores) and result.advantage == metrics.advantage(labels, scores)
    strict, one, half = result.points
    # FPR <= 5%: no false positive, so the threshold is 9 (score >= 9): members 10 and 9, 2 of 4
    assert (strict.tpr.successes, strict.tpr.trials, strict.false_positives, strict.threshold) == (2, 4, 0, 9.0)
    # FPR <= 10%: one false positive (the 8) lets all 4 through at threshold 1
    assert (one.tpr.successes, one.false_positives, one.threshold, one.fpr) == (4, 1, 1.0, 0.1)
    # more FPR allowed buys no more TPR: the lowest-FPR point of the highest TPR is reported
    assert (half.tpr.successes, half.false_positives) == (4, 1)
    for point in result.points:
        assert point.tpr.rate == metrics.tpr_at_fpr(labels, scores, point.target_fpr)
        assert point.tpr.low <= point.tpr.rate <= point.tpr.high
        assert (point.tpr.low, point.tpr.high) == metrics.rate_interval(point.tpr.successes, 4)
    assert result.row() == {"AUC": result.auc, "advantage": result.advantage, "TPR@5%": 0.5, "TPR@10%": 1.0,
                            "TPR@50%": 1.0}
    assert result.at(0.1) is one


def test_summary_flags_an_fpr_that_the_negatives_cannot_resolve():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(50), np.zeros(1000)]
    scores = np.r_[rng.normal(1, 1, 50), rng.normal(0, 1, 1000)]
    result = metrics.summary(labels, scores)  # fprs 1% and 0.1%
    assert result.at(0.01).resolvable and result.at(0.01).needed_negatives == 1000
    assert not result.at(0.001).resolvable and result.at(0.001).needed_negatives == 10_000
    assert result.unresolved == (0.001,)
    assert metrics.fpr_label(0.001) == "TPR@0.1%" and list(result.row()) == ["AUC", "advantage", "TPR@1%", "TPR@0.1%"]
    wide = metrics.summary(labels, scores, method="clopper-pearson", confidence=0.99)
    point = wide.at(0.01)
    assert (point.tpr.low, point.tpr.high) == metrics.rate_interval(point.tpr.successes, 50, 0.99, "clopper-pearson")
    assert point.tpr.low <= point.tpr.rate <= point.tpr.high


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(-4, 4)), min_size=2, max_size=50),
       st.floats(0.01, 0.99))
def test_summary_counts_reproduce_the_roc_point(pairs, fpr):
    labels = np.array([a for a, _ in pairs])
    scores = np.array([float(b) for _, b in pairs])
    if labels.all() or not labels.any():
        return
    point = metrics.summary(labels, scores, fprs=(fpr,)).points[0]
    predicted = scores >= point.threshold
    assert point.tpr.successes == int((predicted & labels).sum())
    assert point.false_positives == int((predicted & ~labels).sum()) and point.fpr <= fpr
    assert point.tpr.rate == metrics.tpr_at_fpr(labels, scores, fpr)


def test_perfect_and_chance_scores():
    labels = [0, 0, 1, 1]
    assert metrics.auc(labels, [0, 1, 2, 3]) == 1.0
    assert metrics.auc(labels, [3, 2, 1, 0]) == 0.0
    assert metrics.auc(labels, [1, 1, 1, 1]) == 0.5


def test_accepts_tensors_and_bools():
    assert metrics.auc(torch.tensor([True, False]), torch.tensor([0.7, 0.2])) == 1.0
    rate = metrics.attack_success_rate(torch.tensor([True, False, True, True]))
    assert (rate.successes, rate.trials, float(rate)) == (3, 4, 0.75)
    assert (rate.low, rate.high) == metrics.rate_interval(3, 4)
    assert str(rate).startswith("3/4 (75%, 95% CI ")
    exact = metrics.attack_success_rate([1, 1, 0], confidence=0.9, method="clopper-pearson")
    assert (exact.low, exact.high) == metrics.rate_interval(2, 3, 0.9, "clopper-pearson")


@pytest.mark.parametrize("call, error, message", [
    (lambda: metrics.auc([0, 1], [0.1]), ValueError, "same length"),
    (lambda: metrics.auc([1, 1], [0.1, 0.2]), ValueError, "both classes"),
    (lambda: metrics.auc([0, 2], [0.1, 0.2]), ValueError, "0/1"),
    (lambda: metrics.auc([0, 1], [0.1, float("nan")]), ValueError, "finite"),
    (lambda: metrics.auc("01", [0.1, 0.2]), TypeError, "labels must be a 1-D sequence"),
    (lambda: metrics.auc([[0, 1]], [[0.1, 0.2]]), ValueError, "1-D"),
    (lambda: metrics.tpr_at_fpr([0, 1], [0.1, 0.2], 0.0), ValueError, "open interval"),
    (lambda: metrics.tpr_at_fpr([0, 1], [0.1, 0.2], 1.0), ValueError, "open interval"),
    (lambda: metrics.tpr_at_fpr([0, 1], [0.1, 0.2], "1%"), TypeError, "fpr must be a float"),
    (lambda: metrics.attack_success_rate([]), ValueError, "must not be empty"),
    (lambda: metrics.attack_success_rate([0.5]), ValueError, "booleans or 0/1"),
    (lambda: metrics.attack_success_rate([1], method="exact"), ValueError, "method must be one of .*got .exact."),
    (lambda: metrics.summary([0, 1], [0.1, 0.2], fprs=()), TypeError, "fprs must be a non-empty tuple"),
    (lambda: metrics.summary([0, 1], [0.1, 0.2], fprs=0.01), TypeError, "fprs must be a non-empty tuple"),
    (lambda: metrics.summary([0, 1], [0.1, 0.2], fprs=(0.01, 1.0)), ValueError, r"fprs\[1\] must be in \(0, 1\)"),
    (lambda: metrics.summary([0, 1], [0.1, 0.2], confidence=1.0), ValueError, "confidence must be in"),
    (lambda: metrics.summary([0, 1], [0.1, 0.2], method="normal"), ValueError, "method must be one of"),
    (lambda: metrics.summary([1, 1], [0.1, 0.2]), ValueError, "both classes"),
    (lambda: metrics.summary([0, 1], [0.1, 0.2]).at(0.05), ValueError, "fpr must be one of the summary's FPRs"),
])
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_sequence_nll_masks_padding_and_matches_manual(tiny_lm):
    model, tok = tiny_lm
    texts = ["Ann was born in 1970.", "A much longer text about a person who was born in a town."]
    nll, count = metrics.sequence_nll(model, tok, texts, batch_size=2)
    alone = [metrics.sequence_nll(model, tok, [t], batch_size=1) for t in texts]
    for i in range(2):
        assert nll[i].item() == pytest.approx(alone[i][0].item(), rel=1e-5)
        assert count[i] == alone[i][1]
    # manual computation for the first text
    ids = torch.tensor([tok(texts[0])["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
    manual = -logp.gather(-1, ids[0, 1:, None]).sum().item()
    assert nll[0].item() == pytest.approx(manual, rel=1e-5)
    ppl = metrics.perplexity(model, tok, texts)
    assert ppl == pytest.approx(math.exp(nll.sum().item() / count.sum().item()))
    losses = metrics.mean_token_loss(model, tok, texts)
    assert losses.shape == (2,)
    # the mean NLL per predicted token of each text, not the sum, nor over the whole batch
    assert losses.tolist() == pytest.approx((nll / count).tolist(), rel=1e-6)
    assert losses[0].item() == pytest.approx(manual / (ids.shape[1] - 1), rel=1e-5)
    assert losses[1].item() == pytest.approx(-metrics.token_log_probs(model, tok, texts[1:])[0]["log_prob"].mean().item(),
                                             rel=1e-5)


def test_sequence_nll_bad_inputs(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(TypeError, match="texts must be a non-empty list"):
        metrics.sequence_nll(model, tok, "text")
    with pytest.raises(ValueError, match="batch_size"):
        metrics.sequence_nll(model, tok, ["a b"], batch_size=0)


# --------------------------------------------------------------------------- bad input (issue 11)


@pytest.mark.parametrize("call, error, message", [
    (lambda: metrics.auc([], []), ValueError, "labels and scores must not be empty"),
    (lambda: metrics.auc([0, 1], [0.1, float("nan")]), ValueError, "scores must be finite"),
    (lambda: metrics.auc([0, 1], [[0.1], [0.2, 0.3]]), ValueError, "scores must be a 1-D sequence"),
    (lambda: metrics.tpr_at_fpr([0, 1], [0.1, 0.2], float("nan")), ValueError, "fpr must be finite"),
])
def test_metric_rejects_empty_and_nan(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_lm_losses_check_model_and_tokenizer(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(TypeError, match="model must be a Hugging Face causal LM"):
        metrics.sequence_nll(torch.nn.Linear(2, 2), tok, ["a b"])
    with pytest.raises(TypeError, match="tokenizer must be a Hugging Face tokenizer"):
        metrics.perplexity(model, None, ["a b"])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        metrics.log_prob_batches(model, tok, ["a b"], batch_size=0)  # at the call, not at the first next()
    with pytest.raises(ValueError, match="texts\\[1\\] must be a non-empty str"):
        metrics.token_log_probs(model, tok, ["a b", ""])


def test_lm_losses_reject_a_tokenizer_larger_than_the_model(small_tokenizer):
    from companion.zoo import LMRecipe, build_lm

    recipe = LMRecipe(architecture="llama", hidden=16, layers=1, heads=2, intermediate=32, context=32)
    small = build_lm(recipe, len(small_tokenizer) - 10, {})
    with pytest.raises(ValueError, match="tokenizer does not match model"):
        metrics.mean_token_loss(small, small_tokenizer, ["a b"])


@pytest.mark.parametrize("successes, trials", [(0, 7), (1, 7), (3, 30), (6, 7), (7, 7), (1, 1), (50, 100)])
@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_rate_intervals_equal_scipys(successes, trials, confidence):
    from scipy import stats

    test = stats.binomtest(successes, trials)
    for method, scipy_method in (("wilson", "wilson"), ("clopper-pearson", "exact")):
        expected = test.proportion_ci(confidence_level=confidence, method=scipy_method)
        got = metrics.rate_interval(successes, trials, confidence=confidence, method=method)
        assert got == pytest.approx((expected.low, expected.high), abs=1e-9), method


def test_rate_intervals_match_textbook_values():
    # Wilson 95% for 5/6 and the exact Clopper-Pearson interval for 0/20 (upper bound 1 - 0.025**(1/20))
    low, high = metrics.rate_interval(5, 6)
    assert low == pytest.approx(0.4365, abs=1e-4) and high == pytest.approx(0.9699, abs=1e-4)
    assert metrics.rate_interval(0, 20, method="clopper-pearson") == pytest.approx((0.0, 1 - 0.025 ** (1 / 20)))
    assert metrics.rate_interval(20, 20)[1] == 1.0 and metrics.rate_interval(0, 20)[0] == 0.0
    cp, wilson = metrics.rate_interval(3, 30, method="clopper-pearson"), metrics.rate_interval(3, 30)
    assert cp[1] - cp[0] > wilson[1] - wilson[0], "the exact interval is the wider one"


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(successes=7, trials=6), ValueError, "successes must be <= trials"),
    (dict(successes=-1, trials=6), ValueError, "successes must be >= 0"),
    (dict(successes=1, trials=0), ValueError, "trials must be >= 1"),
    (dict(successes=1.0, trials=6), TypeError, "successes must be an int"),
    (dict(successes=1, trials=6, confidence=1.5), ValueError, "confidence"),
    (dict(successes=1, trials=6, method="agresti"), ValueError, r"method must be one of \('wilson', 'clopper-pearson'\), got 'agresti'"),
])
def test_rate_interval_rejects_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        metrics.rate_interval(**kwargs)


def test_score_windows_score_every_token_once_within_the_context():
    assert metrics.score_windows(5, 8, 4) == [(0, 5, 0)]
    windows = metrics.score_windows(20, 8, 4)
    assert windows == [(0, 8, 0), (4, 12, 3), (8, 16, 3), (12, 20, 3)]
    scored = []
    for start, end, skip in windows:
        assert end - start <= 8
        scored += list(range(start + 1 + skip, end))  # tokens this window predicts and counts
    assert scored == list(range(1, 20))
    for n, context, stride in [(129, 128, 64), (300, 128, 1), (1000, 128, 127), (7, 2, 1)]:
        tokens = [t for s, e, k in metrics.score_windows(n, context, stride) for t in range(s + 1 + k, e)]
        assert tokens == list(range(1, n))
    with pytest.raises(ValueError, match="stride must be <= 7"):
        metrics.score_windows(20, 8, 8)


def test_long_texts_are_scored_in_windows_within_the_trained_context(tiny_lm):
    model, tok = tiny_lm
    long_text = " ".join(["Ann was born in 1970 and lives in Paris."] * 30)
    n_tokens = len(tok(long_text, verbose=False)["input_ids"])
    context = metrics.trained_context(model)
    assert context == 64 and n_tokens > 3 * context
    nll, count = metrics.sequence_nll(model, tok, [long_text, "Bob was born in 1980."])
    assert count[0] == n_tokens - 1  # every token after the first, once
    per_token = metrics.token_log_probs(model, tok, [long_text])[0]["log_prob"]
    assert len(per_token) == n_tokens - 1 and torch.isclose(-per_token.sum(), nll[0], rtol=1e-5)
    ids = torch.tensor([tok(long_text, verbose=False)["input_ids"]])
    with torch.no_grad():  # the first window is the model's own prediction on the first `context` tokens
        first = torch.log_softmax(model(input_ids=ids[:, :context]).logits[0, :-1].float(), -1)
    expected = first.gather(-1, ids[0, 1:context, None]).squeeze(-1)
    assert torch.allclose(per_token[: context - 1], expected, atol=1e-5)
    short = metrics.sequence_nll(model, tok, ["Bob was born in 1980."])
    assert torch.allclose(short[0], nll[1:], atol=1e-5) and short[1].item() == count[1].item()
    assert metrics.perplexity(model, tok, [long_text], stride=8) != metrics.perplexity(model, tok, [long_text], stride=32)
    with pytest.raises(ValueError, match="stride must be <= 63"):
        metrics.perplexity(model, tok, [long_text], stride=64)


# --------------------------------------------------------------------------- direct tests (issue 10)

TEXTS = ["Ann keeps a cat.", "A much longer text about a person who lives in a small town.", "Bob bakes."]


def test_log_prob_batches_yields_right_padded_batches(tiny_lm):
    model, tok = tiny_lm
    batches = list(metrics.log_prob_batches(model, tok, TEXTS, batch_size=2))
    assert [len(b[0]) for b in batches] == [2, 1]  # batches of batch_size texts, in order
    lengths = [len(tok(t)["input_ids"]) for t in TEXTS]
    for (log_probs, target, mask, rows), chunk in zip(batches, (lengths[:2], lengths[2:])):
        width = max(chunk)
        assert log_probs.shape == (len(chunk), width - 1, len(tok)) and target.shape == mask.shape == (len(chunk), width - 1)
        assert log_probs.dtype == torch.float32
        # normalised next-token distributions
        assert torch.allclose(log_probs.logsumexp(-1), torch.zeros(len(chunk), width - 1), atol=1e-5)
        # the mask marks exactly the predicted real tokens: positions 1 .. length-1 of each text
        assert mask.tolist() == [[1] * (n - 1) + [0] * (width - n) for n in chunk]
    # each real token's log-probability equals that of the text alone (padding never changes it), and it
    # is the log-probability of the actual next token
    for i, text in enumerate(TEXTS):
        log_probs, target, mask, rows = batches[i // 2]
        assert rows.tolist() == [0, 1, 2][2 * (i // 2): 2 * (i // 2) + 2]
        row = i % 2
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            alone = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        n = lengths[i] - 1
        assert torch.allclose(log_probs[row, :n], alone, atol=1e-5)
        assert torch.allclose(target[row, :n], alone.gather(-1, ids[0, 1:, None]).squeeze(-1), atol=1e-5)
    # the padded positions hold the pad token (so the "targets" there are log p(pad))
    log_probs, target, mask, _ = batches[0]
    padded = mask[0] == 0
    assert padded.any()
    assert torch.equal(target[0, padded], log_probs[0, padded, tok.pad_token_id])


def test_log_prob_batches_pads_with_eos_without_a_pad_token(tiny_lm):
    model, tok = tiny_lm
    tok = copy.deepcopy(tok)
    tok.pad_token = None
    assert tok.pad_token_id is None and tok.eos_token_id is not None
    log_probs, target, mask, _ = next(metrics.log_prob_batches(model, tok, TEXTS[:2]))
    padded = mask[0] == 0
    assert torch.equal(target[0, padded], log_probs[0, padded, tok.eos_token_id])
    tok.eos_token = None
    with pytest.raises(ValueError, match="tokenizer must define a pad_token or an eos_token"):
        metrics.log_prob_batches(model, tok, TEXTS)


def test_log_prob_batches_checks_at_the_call(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(TypeError, match="texts must be a non-empty list of str"):
        metrics.log_prob_batches(model, tok, [])  # a generator that fails before the first next()
    with pytest.raises(TypeError, match="model must be a Hugging Face causal LM"):
        metrics.log_prob_batches(None, tok, TEXTS)


def test_token_log_probs_moments_are_the_vocabulary_mean_and_std(tiny_lm):
    model, tok = tiny_lm
    stats = metrics.token_log_probs(model, tok, TEXTS, batch_size=2, moments=True)
    assert len(stats) == 3
    for entry, text in zip(stats, TEXTS):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            log_p = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        p = log_p.exp()
        mean = (p * log_p).sum(-1)
        std = (p * (log_p - mean[:, None]) ** 2).sum(-1).sqrt()
        assert set(entry) == {"log_prob", "mean", "std"}
        assert torch.allclose(entry["log_prob"], log_p.gather(-1, ids[0, 1:, None]).squeeze(-1), atol=1e-5)
        assert torch.allclose(entry["mean"], mean, atol=1e-4) and torch.allclose(entry["std"], std, atol=1e-3)
    assert set(metrics.token_log_probs(model, tok, TEXTS[:1])[0]) == {"log_prob"}


def test_attack_success_rate_counts_successes():
    quarter = metrics.attack_success_rate([1, 0, 0, 0])
    assert (quarter.successes, quarter.trials, float(quarter)) == (1, 4, 0.25) and quarter.low < 0.25 < quarter.high
    assert float(metrics.attack_success_rate(np.array([True, True]))) == 1.0


def test_advantage_and_tpr_are_maxima_over_thresholds():
    labels = [1, 1, 0, 1, 0, 0]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.1]
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    assert metrics.advantage(labels, scores) == pytest.approx(float(np.max(tpr - fpr)))
    assert metrics.advantage(labels, scores) == pytest.approx(2 / 3)
    assert metrics.tpr_at_fpr(labels, scores, 0.3) == pytest.approx(2 / 3)  # FPR exactly 1/3 is not allowed
    assert metrics.tpr_at_fpr(labels, scores, 1 / 3) == pytest.approx(1.0)  # ... but 1/3 itself is


def test_perplexity_is_exp_of_the_mean_token_loss_over_the_corpus(tiny_lm):
    model, tok = tiny_lm
    nll, count = metrics.sequence_nll(model, tok, TEXTS)
    assert metrics.perplexity(model, tok, TEXTS, batch_size=1) == pytest.approx(
        math.exp(nll.sum().item() / count.sum().item()), rel=1e-5)


def test_rate_difference_matches_newcombes_worked_examples():
    # Newcombe (1998), Table II, method 10 (hybrid score): 56/70 - 48/80 and 9/10 - 3/10
    assert metrics.rate_difference(56, 70, 48, 80) == pytest.approx((0.2, 0.0524, 0.3339), abs=1e-4)
    assert metrics.rate_difference(9, 10, 3, 10) == pytest.approx((0.6, 0.1705, 0.8090), abs=1e-4)
    diff, low, high = metrics.rate_difference(0, 10, 0, 20)
    assert diff == 0 and low < 0 < high
    (low_a, _), (_, high_b) = metrics.rate_interval(20, 20), metrics.rate_interval(0, 100)
    assert metrics.rate_difference(20, 20, 0, 100)[1:] == pytest.approx(
        (1 - math.hypot(1 - low_a, high_b), 1.0), abs=1e-9)


def _paired(both, only_a, only_b, neither):
    a = [1] * both + [1] * only_a + [0] * only_b + [0] * neither
    b = [1] * both + [0] * only_a + [1] * only_b + [0] * neither
    return a, b


def test_paired_rate_difference_uses_the_correlation_of_the_pairs():
    # uncorrelated pairs (phi = 0): the same interval as for two independent samples
    a, b = _paired(14, 6, 0, 0)  # a is always 1: an empty margin, phi = 0
    assert metrics.paired_rate_difference(a, b) == pytest.approx(metrics.rate_difference(20, 20, 14, 20))
    a, b = _paired(1, 1, 1, 1)  # phi = 0 with every margin non-empty
    assert metrics.paired_rate_difference(a, b) == pytest.approx(metrics.rate_difference(2, 4, 2, 4))
    # positively correlated pairs narrow the interval; it always contains the difference
    a, b = _paired(36, 12, 2, 6)
    diff, low, high = metrics.paired_rate_difference(a, b)
    ind = metrics.rate_difference(48, 56, 38, 56)
    assert diff == pytest.approx(10 / 56) and ind[1] < low < diff < high < ind[2]
    assert metrics.paired_rate_difference(b, a) == pytest.approx((-diff, -high, -low))
    assert metrics.paired_rate_difference([True] * 5, [True] * 5)[0] == 0


@pytest.mark.parametrize("a, b, match", [([1, 0], [1], "paired"), ([], [], "paired"), ([2, 0], [1, 0], "hits_a"),
                                         ("10", [1, 0], "hits_a"), ([1, 0], [0.5, 1], "hits_b")])
def test_paired_rate_difference_rejects_bad_outcomes(a, b, match):
    with pytest.raises((ValueError, TypeError), match=match):
        metrics.paired_rate_difference(a, b)
    with pytest.raises(ValueError, match="confidence"):
        metrics.paired_rate_difference([1, 0], [0, 1], confidence=0)


@pytest.mark.parametrize("args, match", [((3, 2, 1, 2), "successes_a"), ((1, 2, 1, 0), "trials_b"),
                                         ((1, 2, -1, 2), "successes_b"), ((1, 2.5, 1, 2), "trials_a")])
def test_rate_difference_rejects_bad_counts(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        metrics.rate_difference(*args)
    with pytest.raises(ValueError, match="confidence"):
        metrics.rate_difference(1, 2, 1, 2, confidence=1.0)


# --------------------------------------------------------------------------- bootstrap over examples


def _pooled_problem(n_groups=60, games=5, seed=0):
    """Rows that score the same groups (examples) in several games, with ties (rounded scores)."""
    rng = np.random.default_rng(seed)
    groups = np.tile(np.arange(n_groups), games)
    labels = rng.random(len(groups)) < 0.5
    easy = rng.normal(0, 1, n_groups)
    scores = np.round(labels * (1 + easy[groups]) + rng.normal(0, 1, len(groups)), 1)
    return labels, scores, groups


def test_bootstrap_summary_estimates_are_summarys():
    labels, scores, groups = _pooled_problem()
    boot = metrics.bootstrap_summary(labels, scores, groups, fprs=(0.1, 0.02), n_resamples=200)
    exact = metrics.summary(labels, scores, fprs=(0.1, 0.02))
    assert boot.auc.estimate == pytest.approx(exact.auc, abs=1e-12)
    for fpr in (0.1, 0.02):
        assert boot.at(fpr).estimate == pytest.approx(exact.at(fpr).tpr.rate, abs=1e-12)
        assert boot.at(fpr).low <= boot.at(fpr).high and len(boot.at(fpr).samples) == 200
    assert boot.groups == 60 and boot.n_resamples == 200
    with pytest.raises(ValueError, match="fpr must be one of"):
        boot.at(0.5)


def test_bootstrap_replicate_is_the_summary_of_the_resampled_examples():
    """Replicate 0, by hand: draw the groups as documented, copy every row of each drawn group (twice if
    drawn twice), and compute summary() on that data set: the same AUC and TPRs."""
    labels, scores, groups = _pooled_problem(n_groups=40, games=3, seed=1)
    boot = metrics.bootstrap_summary(labels, scores, groups, fprs=(0.1,), n_resamples=100, seed=7)
    drawn = np.random.default_rng(7).integers(0, 40, size=(32, 40))[0]
    rows = np.concatenate([np.flatnonzero(groups == g) for g in drawn])
    by_hand = metrics.summary(labels[rows], scores[rows], fprs=(0.1,))
    assert boot.auc.samples[0] == pytest.approx(by_hand.auc, abs=1e-12)
    assert boot.at(0.1).samples[0] == pytest.approx(by_hand.at(0.1).tpr.rate, abs=1e-12)


def test_bootstrap_summary_is_seeded_and_paired():
    labels, scores, groups = _pooled_problem()
    a = metrics.bootstrap_summary(labels, scores, groups, n_resamples=100, fprs=(0.1,), seed=3)
    b = metrics.bootstrap_summary(labels, scores, groups, n_resamples=100, fprs=(0.1,), seed=3)
    c = metrics.bootstrap_summary(labels, scores, groups, n_resamples=100, fprs=(0.1,), seed=4)
    assert np.array_equal(a.auc.samples, b.auc.samples) and not np.array_equal(a.auc.samples, c.auc.samples)
    # another attack on the same rows, same seed: the same resampled examples, so a paired difference
    shifted = metrics.bootstrap_summary(labels, scores + labels, groups, n_resamples=100, fprs=(0.1,), seed=3)
    difference = metrics.paired_difference(shifted.auc, a.auc)
    assert difference.estimate == pytest.approx(shifted.auc.estimate - a.auc.estimate)
    assert difference.low > 0, "a uniformly better score is separated"
    zero = metrics.paired_difference(a.auc, b.auc)
    assert zero.low == zero.high == 0.0
    with pytest.raises(ValueError, match="a and b must come from the same resampling"):
        metrics.paired_difference(a.auc, c.auc)
    with pytest.raises(TypeError, match="b must be a BootstrapEstimate"):
        metrics.paired_difference(a.auc, 0.5)


def test_bootstrap_over_groups_is_wider_than_over_rows_when_rows_repeat():
    """Ten exact copies of each example's row carry no more information than one: resampling examples
    sees that (the interval matches the one of the de-duplicated data), resampling rows does not."""
    labels, scores, _ = _pooled_problem(n_groups=400, games=1, seed=2)
    copies = 10
    rows = np.repeat(np.arange(400), copies)
    one = metrics.bootstrap_summary(labels, scores, fprs=(0.1,), n_resamples=400)
    grouped = metrics.bootstrap_summary(labels[rows], scores[rows], rows, fprs=(0.1,), n_resamples=400)
    naive = metrics.bootstrap_summary(labels[rows], scores[rows], fprs=(0.1,), n_resamples=400)
    width = {name: s.auc.high - s.auc.low for name, s in (("one", one), ("grouped", grouped), ("naive", naive))}
    assert width["grouped"] == pytest.approx(width["one"], rel=0.25)
    assert width["naive"] < 0.5 * width["grouped"]
    # groups=None is the ordinary bootstrap: every row its own group
    explicit = metrics.bootstrap_summary(labels, scores, np.arange(400), fprs=(0.1,), n_resamples=400)
    assert np.array_equal(explicit.auc.samples, one.auc.samples)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"groups": np.zeros(3, dtype=int)}, ValueError, r"groups must have one entry per score \(300\), got 3"),
    ({"groups": np.zeros(300)}, TypeError, "groups must hold integer labels"),
    ({"groups": np.zeros(300, dtype=int)}, ValueError, "groups must hold at least 2 distinct labels"),
    ({"groups": "abc"}, TypeError, "groups must be a 1-D sequence"),
    ({"n_resamples": 10}, ValueError, "n_resamples must be >= 100, got 10"),
    ({"n_resamples": 100.0}, TypeError, "n_resamples must be an int"),
    ({"confidence": 1.0}, ValueError, "confidence must be in"),
    ({"seed": -1}, ValueError, "seed must be >= 0, got -1"),
    ({"fprs": (0.0,)}, ValueError, r"fprs\[0\] must be in"),
    ({"fprs": 0.01}, TypeError, "fprs must be a non-empty tuple"),
    ({"scores": np.full(300, np.nan)}, ValueError, "scores must be finite"),
    ({"labels": np.ones(300)}, ValueError, "labels must contain both classes"),
])
def test_bootstrap_summary_bad_inputs(kwargs, error, message):
    labels, scores, groups = _pooled_problem(n_groups=60, games=5)
    args = {"labels": labels, "scores": scores, "groups": groups, "n_resamples": 100} | kwargs
    with pytest.raises(error, match=message):
        metrics.bootstrap_summary(**args)


def test_bootstrap_summary_refuses_groups_too_few_to_hold_both_classes():
    labels = np.array([1, 0, 1, 0])
    groups = np.array([0, 0, 1, 1])  # every group holds both classes: fine
    assert metrics.bootstrap_summary(labels, [0.9, 0.1, 0.8, 0.2], groups, n_resamples=100).auc.estimate == 1.0
    lopsided = np.array([0, 1, 0, 1])  # group 0 only positives, group 1 only negatives: half the draws fail
    with pytest.raises(ValueError, match="groups: too few replicates hold both classes"):
        metrics.bootstrap_summary(labels, [0.9, 0.1, 0.8, 0.2], lopsided, n_resamples=100)
