import math
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from companion import metrics, mia


def _fixed_classifier():
    model = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    return model


def test_classifier_scores_on_a_hand_checkable_case():
    model = _fixed_classifier()
    x = torch.tensor([[1.0, 0.0]])  # logits (2, 0, 0)
    y = torch.tensor([0])
    p = torch.softmax(torch.tensor([2.0, 0.0, 0.0]), 0)
    assert mia.confidence_scores(model, x, y).item() == pytest.approx(p[0].item())
    assert mia.loss_scores(model, x, y).item() == pytest.approx(math.log(p[0].item()))
    assert mia.entropy_scores(model, x).item() == pytest.approx(float((p * p.log()).sum()))
    mentr = -(1 - p[0]) * p[0].log() - p[1] * (1 - p[1]).log() - p[2] * (1 - p[2]).log()
    assert mia.modified_entropy_scores(model, x, y).item() == pytest.approx(-mentr.item(), rel=1e-5)


def test_classifier_scores_rank_a_fitted_point_above_a_wrong_one():
    model = _fixed_classifier()
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([0, 2])  # the second label disagrees with the prediction
    for score in (mia.loss_scores, mia.confidence_scores, mia.modified_entropy_scores):
        values = score(model, x, y)
        assert values[0] > values[1], score.__name__


def test_correctness_is_the_gap_attack():
    model = _fixed_classifier()
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 2, 1])  # correct, wrong, correct
    assert mia.correctness_scores(model, x, y).tolist() == [1.0, 0.0, 1.0]
    # its advantage is the accuracy gap between the two groups
    members = torch.tensor([True, False, True])
    assert metrics.advantage(members.numpy(), mia.correctness_scores(model, x, y).numpy()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same length"):
        mia.correctness_scores(model, x, y[:2])
    with pytest.raises(TypeError, match="model"):
        mia.correctness_scores("not a model", x, y)


def test_min_k_hand_case():
    stats = [{"log_prob": torch.tensor([-1.0, -5.0, -2.0, -4.0, -3.0])}]
    assert mia.min_k_scores(stats, k=0.4).item() == pytest.approx(-4.5)
    assert mia.min_k_scores(stats, k=1.0).item() == pytest.approx(-3.0)
    assert mia.lm_loss_scores(stats).item() == pytest.approx(-3.0)


def test_min_k_plus_plus_matches_its_formula(tiny_lm):
    model, tok = tiny_lm
    text = "Ann was born in 1970. Ann keeps a cat."
    stats = metrics.token_log_probs(model, tok, [text], moments=True)[0]
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    p = log_p.exp()
    mu = (p * log_p).sum(-1)
    sigma = ((p * (log_p - mu[:, None]) ** 2).sum(-1)).sqrt()
    target = log_p.gather(-1, ids[0, 1:, None]).squeeze(-1)
    assert torch.allclose(stats["log_prob"], target, atol=1e-5)
    assert torch.allclose(stats["mean"], mu, atol=1e-4) and torch.allclose(stats["std"], sigma, atol=1e-3)
    z = ((target - mu) / sigma).sort().values
    n = int(len(z) * 0.3)
    assert mia.min_k_plus_plus_scores([stats], k=0.3).item() == pytest.approx(z[:n].mean().item(), abs=1e-3)


def test_zlib_and_reference_scores():
    stats = [{"log_prob": torch.tensor([-1.0, -1.0])}, {"log_prob": torch.tensor([-3.0, -1.0])}]
    texts = ["aaaa", "abcdefgh"]
    # the standard zlib ratio: the *mean* log-likelihood (minus the log-perplexity) over the zlib length
    expected = [-1.0 / len(zlib.compress(b"aaaa")), -2.0 / len(zlib.compress(b"abcdefgh"))]
    assert mia.zlib_scores(stats, texts).tolist() == pytest.approx(expected)
    # so it does not depend on the text's length through the sum: twice the tokens, same mean, same score
    doubled = [{"log_prob": torch.tensor([-1.0] * 4)}]
    assert mia.zlib_scores(doubled, ["aaaa"]).item() == pytest.approx(expected[0])
    ref = [{"log_prob": torch.tensor([-2.0, -2.0])}, {"log_prob": torch.tensor([-2.0, -2.0])}]
    assert mia.reference_scores(stats, ref).tolist() == pytest.approx([1.0, 0.0])


def test_token_log_probs_agree_with_sequence_nll(tiny_lm):
    model, tok = tiny_lm
    texts = ["Ann keeps a cat.", "A much longer text about a person who lives in a small town."]
    stats = metrics.token_log_probs(model, tok, texts, batch_size=2)
    nll, count = metrics.sequence_nll(model, tok, texts)
    for s, n, c in zip(stats, nll, count):
        assert len(s["log_prob"]) == c
        assert -s["log_prob"].sum().item() == pytest.approx(n.item(), rel=1e-5)


def test_lm_scores_on_both_architectures(tiny_lm):
    model, tok = tiny_lm
    texts = ["Ann keeps a cat.", "Bob lives in a town.", "Carol works as a baker."]
    scores = mia.lm_scores(model, tok, texts, k=0.5, reference=(model, tok))
    assert set(scores) == {"loss", "zlib", "min_k", "min_k_plus_plus", "reference"}
    assert all(v.shape == (3,) and torch.isfinite(v).all() for v in scores.values())
    assert torch.allclose(scores["reference"], torch.zeros(3))  # a model is its own perfect reference


@pytest.mark.parametrize("call, error, message", [
    (lambda: mia.min_k_scores([{"log_prob": torch.zeros(3)}], k=0), ValueError, r"k must be in \(0, 1\]"),
    (lambda: mia.min_k_scores([{"log_prob": torch.zeros(3)}], k=1.5), ValueError, r"k must be in \(0, 1\]"),
    (lambda: mia.min_k_scores([{"log_prob": torch.zeros(3)}], k="20%"), TypeError, "k must be a float"),
    (lambda: mia.min_k_plus_plus_scores([{"log_prob": torch.zeros(3)}]), ValueError, "moments=True"),
    (lambda: mia.zlib_scores([{"log_prob": torch.zeros(3)}], []), ValueError, "same length"),
    (lambda: mia.reference_scores([], [{"log_prob": torch.zeros(1)}]), ValueError, "same length"),
    (lambda: mia.loss_scores(_fixed_classifier(), torch.zeros(2, 2), torch.zeros(3, dtype=torch.long)),
     ValueError, "same length"),
    (lambda: mia.loss_scores(_fixed_classifier(), torch.zeros(1, 2), torch.zeros(1)), TypeError, "integer class labels"),
    (lambda: mia.loss_scores("model", torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)), TypeError, "torch.nn.Module"),
])
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_token_log_probs_bad_inputs(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(TypeError, match="moments must be a bool"):
        metrics.token_log_probs(model, tok, ["a b"], moments="yes")
    with pytest.raises(TypeError, match="texts must be a non-empty list"):
        metrics.token_log_probs(model, tok, [])


# --------------------------------------------------------------------------- shadow-model attacks


def _synthetic_shadow(n_models=32, n=2000, shift=1.0, spread=0.0, noise=1.0, seed=0):
    """Two-class logits whose scaled confidence for label 0 is exactly phi = z_0 - z_1.
    IN ~ N(c_n + shift, noise), OUT ~ N(c_n, noise), with per-example offsets c_n ~ N(0, spread)."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randn(n, generator=g) * spread
    keep = mia.balanced_keep(n_models, n, seed=seed)
    phi = offsets + shift * keep + noise * torch.randn(n_models, n, generator=g)
    logits = torch.stack([phi, torch.zeros_like(phi)], -1)
    labels = torch.zeros(n, dtype=torch.long)
    member = torch.rand(n, generator=g) < 0.5
    target_phi = offsets + shift * member + noise * torch.randn(n, generator=g)
    target = torch.stack([target_phi, torch.zeros_like(target_phi)], -1)
    return mia.ShadowSignals(logits, keep, labels), target, member


def test_scaled_confidence_is_stable_and_exact():
    logits = torch.tensor([[2.0, 0.5, -1.0], [1000.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0])
    phi = mia.scaled_confidence(logits, labels)
    p = torch.softmax(logits[0], 0)[0]
    assert phi[0].item() == pytest.approx(math.log(p / (1 - p)), rel=1e-5)
    assert torch.isfinite(phi).all() and phi[1] > 900


def test_balanced_keep_puts_every_example_in_half_the_models():
    keep = mia.balanced_keep(8, 50, seed=3)
    assert keep.shape == (8, 50) and (keep.sum(0) == 4).all()


def test_lira_recovers_a_known_separation():
    shadow, target, member = _synthetic_shadow(shift=2.0)
    auc = metrics.auc(member.numpy(), mia.lira_scores(shadow, target).numpy())
    expected = torch.distributions.Normal(0, 1).cdf(torch.tensor(2.0 / math.sqrt(2))).item()  # ~0.92
    assert auc == pytest.approx(expected, abs=0.03)


def test_lira_calibrates_per_example_difficulty_where_a_global_threshold_fails():
    shadow, target, member = _synthetic_shadow(shift=1.0, spread=3.0, noise=0.3)
    labels = member.numpy()
    global_auc = metrics.auc(labels, mia.scaled_confidence(target, shadow.labels).numpy())
    for online in (True, False):
        lira_auc = metrics.auc(labels, mia.lira_scores(shadow, target, online=online).numpy())
        assert lira_auc > 0.9 and global_auc < 0.65, (online, lira_auc, global_auc)
    assert metrics.auc(labels, mia.lira_scores(shadow, target, fixed_variance=True).numpy()) > 0.9
    population = torch.nonzero(~member).flatten()[:300]
    assert metrics.auc(labels, mia.rmia_scores(shadow, target, population).numpy()) > 0.85
    # offline RMIA's linear approximation of p(x) is cruder (the paper tunes a per dataset), but it still
    # beats any global threshold
    assert metrics.auc(labels, mia.rmia_scores(shadow, target, population, offline_a=0.3).numpy()) > global_auc + 0.05


def test_shokri_attack_outputs_member_probabilities():
    shadow, target, member = _synthetic_shadow(n_models=8, n=400, shift=3.0)
    scores = mia.shokri_attack(shadow, target)
    assert scores.shape == (400,) and ((scores >= 0) & (scores <= 1)).all()
    assert metrics.auc(member.numpy(), scores.numpy()) > 0.8


def test_too_few_shadow_models_is_a_clear_error():
    shadow, target, _ = _synthetic_shadow(n_models=2, n=50)
    with pytest.raises(ValueError, match="too few shadow models"):
        mia.lira_scores(shadow, target)  # one IN and one OUT model per example: no per-example variance
    assert mia.lira_scores(shadow, target, fixed_variance=True).shape == (50,)
    with pytest.raises(ValueError, match="target_logits must have shape"):
        mia.lira_scores(shadow, target[:10])
    with pytest.raises(TypeError, match="shadow must be a ShadowSignals"):
        mia.lira_scores("signals", target)


def _digits_subset(n=240):
    from companion import data

    x, y = data.load_digits_tensors()
    return x[:n], y[:n]


def _small_mlp():
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_vectorised_shadow_training_matches_the_loop():
    x, y = _digits_subset()
    keep = mia.balanced_keep(3, len(x), seed=0)
    fast = mia.train_shadow_models(_small_mlp, x, y, keep, epochs=4, batch_size=32, lr=3e-3, seed=1)
    slow = mia.train_shadow_models(_small_mlp, x, y, keep, epochs=4, batch_size=32, lr=3e-3, seed=1, vectorized=False)
    assert torch.allclose(fast.logits, slow.logits, atol=1e-4)
    # The models the trainer starts from (it seeds torch with `seed`, then calls make_model K times): a
    # trainer whose updates never reach the parameters (an lr of 0, updates written to a copy) returns
    # exactly these logits, so compare with them, not with some other random initialisation.
    torch.manual_seed(1)
    with torch.no_grad():
        untrained = torch.stack([model(x) for model in [_small_mlp() for _ in range(3)]])
    for k in range(3):
        own = keep[k]
        before = nn.functional.cross_entropy(untrained[k][own], y[own])
        after = nn.functional.cross_entropy(fast.logits[k][own], y[own])
        assert after < 0.95 * before, (k, before, after)  # each model began to fit its own half (15 steps)


def test_shadow_models_fit_their_own_halves():
    x, y = _digits_subset()
    keep = mia.balanced_keep(4, len(x), seed=0)
    signals = mia.train_shadow_models(_small_mlp, x, y, keep, epochs=40, batch_size=32, lr=3e-3, seed=0)
    correct = signals.logits.argmax(-1) == y
    phi = signals.scaled_confidence()
    assert correct[keep].float().mean() > correct[~keep].float().mean()
    assert phi[keep].mean() > phi[~keep].mean() + 0.2  # members are fitted more confidently


@pytest.mark.parametrize("kwargs, message", [
    ({"keep": torch.ones(3, 5, dtype=torch.bool)}, "keep must be a bool tensor"),
    ({"keep": torch.zeros(3, 240, dtype=torch.bool)}, "at least batch_size"),
    ({"epochs": 0}, "epochs must be >= 1"),
])
def test_train_shadow_models_bad_inputs(kwargs, message):
    x, y = _digits_subset()
    args = {"keep": mia.balanced_keep(3, len(x)), "epochs": 1} | kwargs
    with pytest.raises(ValueError, match=message):
        mia.train_shadow_models(_small_mlp, x, y, **args)


def test_train_shadow_models_rejects_bad_model_and_data():
    x, y = _digits_subset()
    keep = mia.balanced_keep(3, len(x))
    with pytest.raises(TypeError, match="make_model must be a function returning"):
        mia.train_shadow_models(_small_mlp(), x, y, keep, epochs=1)
    with pytest.raises(TypeError, match="integer class labels"):
        mia.train_shadow_models(_small_mlp, x, y.float(), keep, epochs=1)


# --------------------------------------------------------------------------- bad input (issue 11)


def test_rmia_rejects_nan_instead_of_scoring_zero():
    shadow, target, _ = _synthetic_shadow(n_models=4, n=20)
    population = torch.arange(10)
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        mia.rmia_scores(shadow, target, population, gamma=float("nan"))
    with pytest.raises(ValueError, match="target_logits must be finite"):
        mia.rmia_scores(shadow, torch.full_like(target, float("nan")), population)
    with pytest.raises(ValueError, match="population must hold example indices"):
        mia.rmia_scores(shadow, target, torch.tensor([0, 99]))
    with pytest.raises(ValueError, match="offline_a must be finite"):
        mia.rmia_scores(shadow, target, population, offline_a=float("nan"))
    with pytest.raises(ValueError, match="logits must be finite"):
        mia.ShadowSignals(torch.full_like(shadow.logits, float("inf")), shadow.keep, shadow.labels)
    with pytest.raises(ValueError, match="labels must be class indices < the number of classes"):
        mia.ShadowSignals(shadow.logits, shadow.keep, shadow.labels + 5)
    with pytest.raises(TypeError, match="online must be a bool"):
        mia.lira_scores(shadow, target, online="no")


@pytest.mark.parametrize("call, error, message", [
    (lambda: mia.loss_scores(_fixed_classifier(), torch.zeros(1, 2), torch.tensor([7])), ValueError,
     "y must be class indices < the number of classes"),
    (lambda: mia.entropy_scores(_fixed_classifier(), torch.full((1, 2), float("nan"))), ValueError,
     "x must be finite"),
    (lambda: mia.scaled_confidence(torch.zeros(3, 2), torch.tensor([0, 1, 2])), ValueError, "labels must be class"),
    (lambda: mia.lm_loss_scores([{"log_prob": torch.zeros(0)}]), ValueError, r"stats\[0\]\['log_prob'\] must not be empty"),
    (lambda: mia.min_k_plus_plus_scores([{"log_prob": torch.zeros(0), "mean": torch.zeros(0), "std": torch.ones(0)}]),
     ValueError, r"stats\[0\]\['log_prob'\] must not be empty"),
    (lambda: mia.min_k_plus_plus_scores([{"log_prob": torch.zeros(2), "mean": torch.zeros(3), "std": torch.ones(2)}]),
     ValueError, r"stats\[0\]\['mean'\] must match 'log_prob'"),
    (lambda: mia.min_k_plus_plus_scores(None), TypeError, "stats must be a non-empty list"),
    (lambda: mia.scaled_confidence([[0.0, 1.0]], torch.zeros(1, dtype=torch.long)), TypeError,
     "logits must be a torch.Tensor"),
    (lambda: mia.zlib_scores([{"log_prob": torch.zeros(2)}], [""]), ValueError, r"texts\[0\] must be a non-empty"),
    (lambda: mia.min_k_scores([{"log_prob": torch.zeros(3)}], k=float("nan")), ValueError, "k must be finite"),
])
def test_bad_inputs_issue_11(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_lm_scores_reject_an_empty_text(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(ValueError, match=r"texts\[1\] must be a non-empty str"):
        mia.lm_scores(model, tok, ["a b c", ""])


@pytest.mark.parametrize("kwargs, error, message", [
    ({"lr": -1e-3}, ValueError, "lr must be > 0, got -0.001"),
    ({"lr": float("inf")}, ValueError, "lr must be a finite number > 0"),
    ({"vectorized": "no"}, TypeError, "vectorized must be a bool"),
])
def test_train_shadow_models_checks_its_recipe(kwargs, error, message):
    x, y = _digits_subset()
    with pytest.raises(error, match=message):
        mia.train_shadow_models(_small_mlp, x, y, mia.balanced_keep(3, len(x)), epochs=1, **kwargs)
    with pytest.raises(ValueError, match="y must be class indices"):
        mia.train_shadow_models(_small_mlp, x, y + 10, mia.balanced_keep(3, len(x)), epochs=1)


def test_scaled_confidence_rejects_nan_logits():
    with pytest.raises(ValueError, match="logits must be finite"):
        mia.scaled_confidence(torch.full((3, 2), float("nan")), torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------- pooled leave-one-out games


def _toy_attack(shadow, logits, population):
    """Scores that reveal membership exactly (the target's own true-class logit, which is higher for
    members in _synthetic_shadow), plus one that records the population it was given."""
    scores = {"true logit": mia.scaled_confidence(logits, shadow.labels)}
    if population is not None:
        marked = torch.zeros(logits.shape[0])
        marked[population] = 1.0
        scores["in population"] = marked
    return scores


def test_pooled_leave_one_out_plays_each_game_in_order():
    shadow, target, target_keep = _synthetic_shadow(n_models=6, n=40)
    pooled = mia.pooled_leave_one_out(shadow, _toy_attack, targets=[(target, target_keep)], n_leave_one_out=3)
    scores, members = pooled["true logit"]  # unpacks like the notebook's (scores, members) pairs
    assert len(scores) == 4 * 40  # one extra target, then shadow models 0, 1, 2; nothing held out
    assert torch.equal(members, torch.cat([target_keep, shadow.keep[0], shadow.keep[1], shadow.keep[2]]))
    assert torch.equal(scores[40:80], mia.scaled_confidence(shadow.logits[0], shadow.labels))
    default = mia.pooled_leave_one_out(shadow, _toy_attack)  # every shadow model in turn
    assert torch.equal(default["true logit"].members, shadow.keep.flatten())


def test_pooled_leave_one_out_leaves_the_population_out():
    shadow, target, target_keep = _synthetic_shadow(n_models=6, n=40)
    pooled = mia.pooled_leave_one_out(shadow, _toy_attack, targets=[(target, target_keep)], n_leave_one_out=2,
                                      n_population=5, seed=3)
    scores, members = pooled["in population"]
    assert len(scores) == 3 * (40 - 5) and not scores.any()  # the population is never among the scored
    # the population is drawn from each game's non-members: every member is still scored
    assert int(members.sum()) == int(target_keep.sum() + shadow.keep[0].sum() + shadow.keep[1].sum())
    again = mia.pooled_leave_one_out(shadow, _toy_attack, targets=[(target, target_keep)], n_leave_one_out=2,
                                     n_population=5, seed=3)
    assert torch.equal(again["true logit"].scores, pooled["true logit"].scores)  # seeded


def test_pooled_leave_one_out_matches_a_hand_written_pooling():
    """The notebook's former evaluate_targets, written out: identical tensors."""
    shadow, target, target_keep = _synthetic_shadow(n_models=5, n=30)
    generator = torch.Generator().manual_seed(0)
    expected_scores, expected_members = [], []
    games = [(shadow, target, target_keep)]
    for t in range(2):
        others = torch.arange(5) != t
        games.append((mia.ShadowSignals(shadow.logits[others], shadow.keep[others], shadow.labels),
                      shadow.logits[t], shadow.keep[t]))
    for rest, logits, members in games:
        outs = torch.nonzero(~members).squeeze(1)
        population = outs[torch.randperm(len(outs), generator=generator)[:4]]
        evaluated = torch.ones(30, dtype=torch.bool)
        evaluated[population] = False
        expected_scores.append(mia.rmia_scores(rest, logits, population)[evaluated])
        expected_members.append(members[evaluated])
    pooled = mia.pooled_leave_one_out(shadow, lambda s, l, p: {"rmia": mia.rmia_scores(s, l, p)},
                                      targets=[(target, target_keep)], n_leave_one_out=2, n_population=4)
    assert torch.equal(pooled["rmia"].scores, torch.cat(expected_scores))
    assert torch.equal(pooled["rmia"].members, torch.cat(expected_members))


@pytest.mark.parametrize("kwargs, error, message", [
    ({"signals": "shadow"}, TypeError, "signals must be a ShadowSignals, got str"),
    ({"attacks": 3}, TypeError, "attacks must be a function"),
    ({"n_leave_one_out": 7}, ValueError, "n_leave_one_out must be <= 6, got 7"),
    ({"n_leave_one_out": 0}, ValueError, "there is no game to pool"),
    ({"n_population": 40}, ValueError, r"n_population must be smaller than every target's number of non-members"),
    ({"targets": [(torch.zeros(3, 2), torch.zeros(3, dtype=torch.bool))]}, ValueError, r"targets\[0\] must be logits"),
    ({"targets": [torch.zeros(3)]}, TypeError, r"targets\[0\] must be a \(logits, members\) pair"),
    ({"attacks": lambda s, l, p: {"short": torch.zeros(3)}}, ValueError, "must score all 40 examples, got 3"),
])
def test_pooled_leave_one_out_bad_inputs(kwargs, error, message):
    shadow, _, _ = _synthetic_shadow(n_models=6, n=40)
    args = {"signals": shadow, "attacks": _toy_attack} | kwargs
    with pytest.raises(error, match=message):
        mia.pooled_leave_one_out(**args)


# --------------------------------------------------------------------------- direct tests (issue 10)


def _shadow_setup_args(**overrides):
    x, _ = _digits_subset(40)
    keep = torch.zeros(2, 40, dtype=torch.bool)
    keep[0, :8] = True  # exactly batch_size examples: allowed
    keep[1, 8:30] = True
    args = {"make_model": _small_mlp, "x": x, "keep": keep, "batch_size": 8, "epochs": 1, "lr": 1e-3, "seed": 0,
            "vectorized": True}
    return args | overrides


def test_check_shadow_setup_accepts_a_valid_setup():
    assert mia.check_shadow_setup(**_shadow_setup_args()) is None
    assert mia.check_shadow_setup(**_shadow_setup_args(vectorized=False, seed=3, epochs=2)) is None


@pytest.mark.parametrize("overrides, error, message", [
    ({"make_model": _small_mlp()}, TypeError, "make_model must be a function returning a fresh nn.Module"),
    ({"make_model": 3}, TypeError, "make_model must be a function"),
    ({"x": torch.zeros(40, 64, dtype=torch.long)}, TypeError, "x must be a floating-point tensor"),
    ({"x": torch.full((40, 64), float("nan"))}, ValueError, "x must be finite"),
    ({"x": torch.zeros(0, 64)}, ValueError, "x must not be empty"),
    ({"epochs": 0}, ValueError, "epochs must be >= 1"),
    ({"lr": 0.0}, ValueError, "lr must be > 0"),
    ({"lr": float("nan")}, ValueError, "lr must be a finite number"),
    ({"seed": -1}, ValueError, "seed must be >= 0"),
    ({"vectorized": 1}, TypeError, "vectorized must be a bool"),
    ({"keep": torch.ones(2, 40, dtype=torch.int64)}, ValueError, r"keep must be a bool tensor \[n_models, 40\]"),
    ({"keep": torch.ones(40, dtype=torch.bool)}, ValueError, "keep must be a bool tensor"),
    ({"keep": torch.ones(2, 39, dtype=torch.bool)}, ValueError, "keep must be a bool tensor"),
    ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
    ({"batch_size": 9}, ValueError, "every model needs at least batch_size=9 training examples, got as few as 8"),
])
def test_check_shadow_setup_names_the_bad_argument(overrides, error, message):
    with pytest.raises(error, match=message):
        mia.check_shadow_setup(**_shadow_setup_args(**overrides))


# --------------------------------------------------------------------------- hand-computed attacks (mutation survivors)


def _tiny_shadow():
    """4 models x 3 examples x 2 classes, every example IN 2 models and OUT of 2, distinct confidences."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 3, 2, generator=g) * 2
    keep = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    labels = torch.tensor([0, 1, 0])
    target = torch.randn(3, 2, generator=g) * 2
    return mia.ShadowSignals(logits, keep, labels), target


def test_lira_equals_its_gaussian_likelihood_ratio_by_hand():
    shadow, target = _tiny_shadow()
    phi = shadow.scaled_confidence()
    observed = mia.scaled_confidence(target, shadow.labels)
    online = mia.lira_scores(shadow, target)
    offline = mia.lira_scores(shadow, target, online=False)
    fixed = mia.lira_scores(shadow, target, fixed_variance=True)
    std_in, std_out = [], []
    for n in range(3):
        ins, outs = phi[shadow.keep[:, n], n], phi[~shadow.keep[:, n], n]
        std_in.append(ins.std()), std_out.append(outs.std())  # the unbiased (n - 1) standard deviation
        normal_in, normal_out = torch.distributions.Normal(ins.mean(), ins.std()), torch.distributions.Normal(outs.mean(), outs.std())
        expected = normal_in.log_prob(observed[n]) - normal_out.log_prob(observed[n])
        assert online[n].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-4)
        assert offline[n].item() == pytest.approx(math.log(normal_out.cdf(observed[n]).item()), rel=1e-4, abs=1e-4)
    s_in, s_out = torch.stack(std_in).median(), torch.stack(std_out).median()
    for n in range(3):
        ins, outs = phi[shadow.keep[:, n], n], phi[~shadow.keep[:, n], n]
        expected = (torch.distributions.Normal(ins.mean(), s_in).log_prob(observed[n])
                    - torch.distributions.Normal(outs.mean(), s_out).log_prob(observed[n]))
        assert fixed[n].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-4)


def test_lira_needs_out_models_for_every_example():
    shadow, target = _tiny_shadow()
    keep = shadow.keep.clone()
    keep[:, 0] = True  # example 0 is in every model: no OUT model to compare with
    lopsided = mia.ShadowSignals(shadow.logits, keep, shadow.labels)
    for kwargs in ({}, {"online": False}, {"fixed_variance": True}, {"online": False, "fixed_variance": True}):
        with pytest.raises(ValueError, match="too few shadow models: every example needs at least"):
            mia.lira_scores(lopsided, target, **kwargs)
    keep[:, 0] = torch.tensor([True, True, True, False])  # one OUT model: enough for a fixed variance only
    single = mia.ShadowSignals(shadow.logits, keep, shadow.labels)
    assert torch.isfinite(mia.lira_scores(single, target, online=False, fixed_variance=True)).all()
    with pytest.raises(ValueError, match="at least 2 OUT"):
        mia.lira_scores(single, target, online=False)


def test_rmia_equals_its_pairwise_ratio_by_hand():
    shadow, target = _tiny_shadow()
    probs = torch.softmax(shadow.logits, -1)[:, torch.arange(3), shadow.labels]  # [K, N] true-class probs
    p_target = torch.softmax(target, -1)[torch.arange(3), shadow.labels]
    population = torch.tensor([0, 2])

    def by_hand(p_marginal, gamma):
        ratio = p_target / p_marginal
        return torch.tensor([sum(float(ratio[x] / ratio[z] > gamma) for z in population.tolist()) / len(population)
                             for x in range(3)])

    for gamma in (1.0, 0.7, 2.0):  # gamma = 1: an example of the population never dominates itself
        assert torch.equal(mia.rmia_scores(shadow, target, population, gamma=gamma), by_hand(probs.mean(0), gamma))
    out = ~shadow.keep
    p_out = (probs * out).sum(0) / out.sum(0)
    for a in (0.0, 0.3, 1.0):
        expected = by_hand(0.5 * ((1 + a) * p_out + (1 - a)), 1.0)
        assert torch.equal(mia.rmia_scores(shadow, target, population, offline_a=a), expected)


def test_rmia_offline_needs_an_out_model_for_every_example():
    shadow, target = _tiny_shadow()
    keep = shadow.keep.clone()
    keep[:, 1] = True
    with pytest.raises(ValueError, match="offline RMIA needs at least one OUT reference model"):
        mia.rmia_scores(mia.ShadowSignals(shadow.logits, keep, shadow.labels), target, torch.tensor([0]), offline_a=0.5)


def test_shokri_attack_is_a_logistic_regression_on_sorted_probabilities():
    from sklearn.linear_model import LogisticRegression

    shadow, target, _ = _synthetic_shadow(n_models=4, n=60, shift=2.0)
    logits = torch.cat([shadow.logits, torch.randn(4, 60, 1, generator=torch.Generator().manual_seed(0))], -1)
    shadow = mia.ShadowSignals(logits, shadow.keep, shadow.labels)  # 3 classes: the sort order matters
    target = torch.cat([target, torch.zeros(60, 1)], -1)

    def features(z):
        p = torch.softmax(z, -1)
        true = p[..., torch.arange(60), shadow.labels] if p.ndim == 3 else p[torch.arange(60), shadow.labels]
        return torch.cat([p.sort(-1, descending=True).values, true.log().unsqueeze(-1)], -1)

    attack = LogisticRegression(max_iter=2000, random_state=0).fit(features(logits).reshape(-1, 4).numpy(),
                                                                    shadow.keep.reshape(-1).numpy())
    expected = torch.tensor(attack.predict_proba(features(target).numpy())[:, 1], dtype=torch.float32)
    assert torch.allclose(mia.shokri_attack(shadow, target), expected, atol=1e-6)


def test_modified_entropy_stays_finite_for_a_confident_wrong_prediction():
    model = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0], [200.0, 0.0], [0.0, 0.0]]))
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])  # predicts class 1 with p = 1.0 in float32
    score = mia.modified_entropy_scores(model, x, y)
    assert torch.isfinite(score).all() and score.item() < -10  # very unlike a member, but a number


def test_min_k_takes_at_least_one_token():
    stats = [{"log_prob": torch.tensor([-1.0, -5.0, -2.0])}]
    assert mia.min_k_scores(stats, k=0.1).item() == pytest.approx(-5.0)  # 10% of 3 tokens rounds to 0: take 1
    assert mia.min_k_plus_plus_scores([{**stats[0], "mean": torch.zeros(3), "std": torch.ones(3)}], k=0.1).item() == \
        pytest.approx(-5.0)


def test_entropy_scores_sum_over_classes():
    model = _fixed_classifier()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.softmax(model(x), -1)
    assert torch.allclose(mia.entropy_scores(model, x), (p * p.log()).sum(1), atol=1e-6)


def test_offline_rmia_averages_each_examples_own_out_models():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(5, 8, 3, generator=g) * 2
    keep = torch.rand(5, 8, generator=g) < 0.5
    keep[0] = False  # every example has at least one OUT model; their numbers differ from example to example
    labels = torch.randint(0, 3, (8,), generator=g)
    shadow = mia.ShadowSignals(logits, keep, labels)
    target = torch.randn(8, 3, generator=g) * 2
    assert len(set((~keep).sum(0).tolist())) > 1
    probs = torch.softmax(logits, -1)[:, torch.arange(8), labels]
    p_target = torch.softmax(target, -1)[torch.arange(8), labels]
    population = torch.arange(8)
    for a in (0.0, 0.5):
        p_out = torch.stack([probs[~keep[:, n], n].mean() for n in range(8)])
        ratio = p_target / (0.5 * ((1 + a) * p_out + (1 - a)))
        expected = (ratio[:, None] / ratio[None, :] > 1.0).float().mean(1)
        assert torch.equal(mia.rmia_scores(shadow, target, population, offline_a=a), expected)


def test_lm_scores_take_the_reference_as_a_zoo_model_or_a_pair(tiny_lm):
    from companion import zoo

    model, tok = tiny_lm
    texts = ["Ann was born in 1970.", "Bob keeps a cat."]
    as_pair = mia.lm_scores(model, tok, texts, reference=(model, tok))["reference"]
    as_entry = mia.lm_scores(model, tok, texts, reference=zoo.ZooModel("ref", model, tok, {}))["reference"]
    assert torch.equal(as_pair, as_entry) and torch.allclose(as_pair, torch.zeros(2), atol=1e-5)  # itself: 0
    with pytest.raises(TypeError, match="reference must be None, a ZooModel or a"):
        mia.lm_scores(model, tok, texts, reference=model)


# --------------------------------------------------------------------------- review s3 (issue: chapter 01)


def test_pooled_rows_name_their_example():
    shadow, target, target_keep = _synthetic_shadow(n_models=6, n=40)
    pooled = mia.pooled_leave_one_out(shadow, _toy_attack, targets=[(target, target_keep)], n_leave_one_out=2,
                                      n_population=5, seed=3)
    rows = pooled["true logit"]
    assert rows.examples.dtype == torch.int64 and len(rows.examples) == len(rows.scores) == 3 * 35
    # every game scores each example at most once, and never one of its population
    for game in range(3):
        chunk = rows.examples[35 * game: 35 * (game + 1)]
        assert len(set(chunk.tolist())) == 35
    whole = mia.pooled_leave_one_out(shadow, _toy_attack, n_leave_one_out=2)["true logit"]
    assert torch.equal(whole.examples, torch.arange(40).repeat(2))
    assert torch.equal(whole.scores[whole.examples == 7], torch.stack(
        [mia.scaled_confidence(shadow.logits[t], shadow.labels)[7] for t in range(2)]))
    with pytest.raises(ValueError, match=r"examples must have one entry per score \(3\), got 2"):
        mia.Pooled(torch.zeros(3), torch.zeros(3, dtype=torch.bool), torch.zeros(2, dtype=torch.long))


def test_lira_global_fixed_variance_is_the_reference_codes():
    """fixed_variance="global" is research/mi_lira_2021's fix_variance: one standard deviation of all
    examples' IN values pooled (np.std, around the grand mean), for both Gaussians; offline, of the OUT
    values. True and "median" are the median of the per-example standard deviations."""
    shadow, target, member = _synthetic_shadow(n_models=8, n=300, shift=1.0, spread=2.0, noise=0.5)
    phi, observed = shadow.scaled_confidence(), mia.scaled_confidence(target, shadow.labels)
    keep = shadow.keep
    mean_in = (phi * keep).sum(0) / keep.sum(0)
    mean_out = (phi * ~keep).sum(0) / (~keep).sum(0)
    sigma = float(np.std(phi[keep].double().numpy()))
    from scipy import stats

    expected = (stats.norm.logpdf(observed.numpy(), mean_in.numpy(), sigma)
                - stats.norm.logpdf(observed.numpy(), mean_out.numpy(), sigma))
    got = mia.lira_scores(shadow, target, fixed_variance="global")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)
    sigma_out = float(np.std(phi[~keep].double().numpy()))
    offline = mia.lira_scores(shadow, target, online=False, fixed_variance="global")
    np.testing.assert_allclose(offline.numpy(), stats.norm.logcdf(observed.numpy(), mean_out.numpy(), sigma_out),
                               rtol=1e-4, atol=1e-4)
    assert torch.equal(mia.lira_scores(shadow, target, fixed_variance="median"),
                       mia.lira_scores(shadow, target, fixed_variance=True))
    # the pooled spread includes the spread between examples (spread=2 here), so it is far wider
    per_example = torch.stack([phi[keep[:, n], n].std() for n in range(300)])
    assert sigma > 3 * float(per_example.median())
    with pytest.raises(ValueError, match="fixed_variance must be False, True, 'median' or 'global', got 'mean'"):
        mia.lira_scores(shadow, target, fixed_variance="mean")
    with pytest.raises(ValueError, match="fixed_variance must be"):
        mia.lira_scores(shadow, target, fixed_variance=1)


def test_rmia_trimmed_mean_is_scipys():
    from scipy import stats

    shadow, target, _ = _synthetic_shadow(n_models=10, n=200, shift=1.0, spread=1.0)
    population = torch.arange(150, 200)
    p = shadow.true_class_probs().numpy()
    p_x = stats.trim_mean(p, 0.2, axis=0)
    p_target = torch.softmax(target, -1)[:, 0].numpy()
    ratio = p_target / p_x
    expected = (ratio[:, None] / ratio[None, population.numpy()] > 2.0).mean(1)
    got = mia.rmia_scores(shadow, target, population, gamma=2.0, proportiontocut=0.2)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    assert torch.equal(mia.rmia_scores(shadow, target, population, proportiontocut=0.0),
                       mia.rmia_scores(shadow, target, population))
    with pytest.raises(ValueError, match=r"proportiontocut must be in \[0, 0.5\)"):
        mia.rmia_scores(shadow, target, population, proportiontocut=0.5)
    with pytest.raises(ValueError, match="proportiontocut applies to online RMIA only"):
        mia.rmia_scores(shadow, target, population, offline_a=0.3, proportiontocut=0.2)
    with pytest.raises(TypeError, match="proportiontocut must be a float"):
        mia.rmia_scores(shadow, target, population, proportiontocut="0.2")


# --------------------------------------------------------------------------- equal IN/OUT leave-one-out games


def _counting_attack(shadow, logits, population):
    """Scores that record the shadow set each example was scored with: its IN minus OUT models, and
    the number of models."""
    n_in = shadow.keep.sum(0)
    return {"in - out": (2 * n_in - len(shadow.keep)).float(),
            "models": torch.full((logits.shape[0],), float(len(shadow.keep)))}


def test_leave_one_out_games_are_one_model_asymmetric_by_default():
    shadow, target, target_keep = _synthetic_shadow(n_models=8, n=60)
    pooled = mia.pooled_leave_one_out(shadow, _counting_attack, targets=[(target, target_keep)], n_leave_one_out=3)
    rows = pooled["in - out"]
    assert torch.equal(rows.scores[:60], torch.zeros(60))  # the extra target: all 8 models, 4 IN and 4 OUT
    loo = rows.scores[60:]
    assert torch.equal(loo, torch.where(rows.members[60:], -1.0, 1.0))  # members 3 IN / 4 OUT, the rest 4 / 3


def test_equal_in_out_evens_every_example_and_keeps_the_rows():
    shadow, target, target_keep = _synthetic_shadow(n_models=8, n=60)
    args = dict(targets=[(target, target_keep)], n_leave_one_out=3, n_population=6, seed=2)
    plain = mia.pooled_leave_one_out(shadow, _counting_attack, **args)
    even = mia.pooled_leave_one_out(shadow, _counting_attack, equal_in_out=True, **args)
    assert torch.equal(even["in - out"].scores, torch.zeros(len(even["in - out"].scores)))
    n_target = 60 - 6
    assert torch.equal(even["models"].scores[:n_target], torch.full((n_target,), 8.0))  # targets unchanged
    assert torch.equal(even["models"].scores[n_target:], torch.full((3 * n_target,), 6.0))  # K - 2 models
    for name in plain:  # the same populations, rows, members and examples
        assert torch.equal(plain[name].members, even[name].members)
        assert torch.equal(plain[name].examples, even[name].examples)


def test_equal_in_out_matches_a_per_example_hand_computation():
    shadow, target, _ = _synthetic_shadow(n_models=8, n=30, spread=1.0, seed=4)
    lira = lambda s, l, p: {"lira": mia.lira_scores(s, l)}  # noqa: E731
    even = mia.pooled_leave_one_out(shadow, lira, n_leave_one_out=2, equal_in_out=True)["lira"]
    for t in range(2):
        for n in range(30):
            others = [k for k in range(8) if k != t]
            dropped = next(k for k in others if shadow.keep[k, n] != shadow.keep[t, n])
            rest = [k for k in others if k != dropped]
            alone = mia.lira_scores(mia.ShadowSignals(shadow.logits[rest], shadow.keep[rest], shadow.labels),
                                    shadow.logits[t])
            assert even.scores[30 * t + n] == alone[n]


@pytest.mark.parametrize("keep_fix, kwargs, error, message", [
    (None, {"equal_in_out": "yes"}, TypeError, "equal_in_out must be a bool"),
    ("unbalanced", {"equal_in_out": True}, ValueError, "equal_in_out needs an even number"),
    ("odd", {"equal_in_out": True}, ValueError, r"got 5 models"),
])
def test_equal_in_out_bad_inputs(keep_fix, kwargs, error, message):
    shadow, _, _ = _synthetic_shadow(n_models=6, n=40)
    if keep_fix == "unbalanced":
        keep = shadow.keep.clone()
        keep[0, 0] = ~keep[0, 0]  # example 0 is IN in 2 or 4 of the 6 models
        shadow = mia.ShadowSignals(shadow.logits, keep, shadow.labels)
    elif keep_fix == "odd":
        shadow = mia.ShadowSignals(shadow.logits[:5], mia.balanced_keep(5, 40), shadow.labels)
    with pytest.raises(error, match=message):
        mia.pooled_leave_one_out(shadow, _counting_attack, n_leave_one_out=2, **kwargs)
    mia.pooled_leave_one_out(shadow, _counting_attack, n_leave_one_out=2)  # fine without it
