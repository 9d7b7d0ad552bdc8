import math
import zlib

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
    expected = [-2.0 / len(zlib.compress(b"aaaa")), -4.0 / len(zlib.compress(b"abcdefgh"))]
    assert mia.zlib_scores(stats, texts).tolist() == pytest.approx(expected)
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
