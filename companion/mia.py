"""Membership inference: one score per example, **higher = more likely a member**.

This module so far holds the attacks that need no shadow models:

- on a classifier: LOSS (Yeom et al. 2018), confidence, entropy and modified entropy (Song & Mittal
  2021, Eq. 8);
- on a language model: LOSS / perplexity, the zlib ratio (Carlini et al. 2021, Sec. 5.2), Min-K%
  (Shi et al. 2024, Eq. 1), Min-K%++ (Zhang et al. 2024, Eq. 2) and reference-model calibration
  (Carlini et al. 2021; Mireshghallah et al. 2022). All of them read one forward pass per text,
  :func:`companion.metrics.token_log_probs`.

Evaluate every score with :mod:`companion.metrics` (``auc``, ``tpr_at_fpr``, ``roc_curve``).
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from companion.metrics import token_log_probs

# ---------------------------------------------------------------------------------------------
# Classifier attacks
# ---------------------------------------------------------------------------------------------


def _check_classifier_inputs(model, x, y) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if y.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")


@torch.no_grad()
def _probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    probs = torch.softmax(model(x).float(), dim=-1)
    model.train(was_training)
    return probs


def loss_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LOSS attack (Yeom et al. 2018): ``-CE(f(x), y)``; members have lower loss."""
    _check_classifier_inputs(model, x, y)
    probs = _probabilities(model, x)
    return probs.gather(1, y[:, None]).squeeze(1).clamp_min(1e-30).log()


def confidence_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The probability of the true class, ``f(x)_y``."""
    _check_classifier_inputs(model, x, y)
    return _probabilities(model, x).gather(1, y[:, None]).squeeze(1)


def entropy_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Negative prediction entropy (members get confident predictions); needs no label."""
    if y is None:
        y = torch.zeros(len(x), dtype=torch.int64)
    _check_classifier_inputs(model, x, y)
    probs = _probabilities(model, x)
    return (probs * probs.clamp_min(1e-30).log()).sum(1)


def modified_entropy_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Negative modified entropy (Song & Mittal 2021, Eq. 8), which uses the label:
    ``Mentr = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)``; low for confident, correct predictions."""
    _check_classifier_inputs(model, x, y)
    p = _probabilities(model, x).clamp(1e-30, 1 - 1e-7)
    p_y = p.gather(1, y[:, None]).squeeze(1)
    others = -(p * (1 - p).log())
    others = others.sum(1) - others.gather(1, y[:, None]).squeeze(1)
    return -(-(1 - p_y) * p_y.log() + others)


# ---------------------------------------------------------------------------------------------
# Language-model attacks
# ---------------------------------------------------------------------------------------------


def _check_k(k) -> float:
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"k must be a float in (0, 1], got {type(k).__name__}")
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    return float(k)


def _lowest_fraction_mean(values: torch.Tensor, k: float) -> float:
    n = max(1, int(len(values) * k))
    return float(values.sort().values[:n].mean())


def lm_loss_scores(stats: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """LOSS on an LM: minus the mean token NLL (``-log perplexity``) of each text."""
    return torch.tensor([float(s["log_prob"].mean()) for s in stats])


def min_k_scores(stats: list[dict[str, torch.Tensor]], k: float = 0.2) -> torch.Tensor:
    """Min-K% Prob (Shi et al. 2024, Eq. 1): the mean log-probability of the ``k`` fraction of tokens
    with the lowest log-probability. A member text has few very surprising tokens."""
    k = _check_k(k)
    return torch.tensor([_lowest_fraction_mean(s["log_prob"], k) for s in stats])


def min_k_plus_plus_scores(stats: list[dict[str, torch.Tensor]], k: float = 0.2) -> torch.Tensor:
    """Min-K%++ (Zhang et al. 2024, Eq. 2): standardise each token's log-probability by the mean and
    standard deviation of ``log p(z | prefix)`` under the model's own next-token distribution, then take
    the mean of the lowest ``k`` fraction. Needs ``token_log_probs(..., moments=True)``."""
    k = _check_k(k)
    if any("mean" not in s for s in stats):
        raise ValueError("min_k_plus_plus_scores needs token statistics computed with moments=True")
    return torch.tensor([_lowest_fraction_mean((s["log_prob"] - s["mean"]) / s["std"].clamp_min(1e-6), k)
                         for s in stats])


def zlib_scores(stats: list[dict[str, torch.Tensor]], texts: list[str]) -> torch.Tensor:
    """The zlib ratio (Carlini et al. 2021): the text's total log-likelihood divided by its zlib-
    compressed length in bytes, so that texts which are merely repetitive do not look like members."""
    if len(stats) != len(texts):
        raise ValueError(f"stats and texts must have the same length, got {len(stats)} and {len(texts)}")
    return torch.tensor([float(s["log_prob"].sum()) / len(zlib.compress(t.encode("utf-8")))
                         for s, t in zip(stats, texts)])


def reference_scores(target_stats: list[dict[str, torch.Tensor]], reference_stats: list[dict[str, torch.Tensor]]
                     ) -> torch.Tensor:
    """Reference-model calibration: the target's mean token log-likelihood minus a reference model's
    (trained on other data from the same distribution). It removes how *easy* a text is for any model."""
    if len(target_stats) != len(reference_stats):
        raise ValueError(f"target_stats and reference_stats must have the same length, "
                         f"got {len(target_stats)} and {len(reference_stats)}")
    return lm_loss_scores(target_stats) - lm_loss_scores(reference_stats)


def lm_scores(model, tokenizer, texts: list[str], k: float = 0.2, reference=None, batch_size: int = 32
              ) -> dict[str, torch.Tensor]:
    """Every LM membership score of this module from one forward pass per text (and one of the
    reference model, given as ``(model, tokenizer)``)."""
    stats = token_log_probs(model, tokenizer, texts, batch_size=batch_size, moments=True)
    scores = {
        "loss": lm_loss_scores(stats),
        "zlib": zlib_scores(stats, texts),
        "min_k": min_k_scores(stats, k),
        "min_k_plus_plus": min_k_plus_plus_scores(stats, k),
    }
    if reference is not None:
        ref_model, ref_tokenizer = reference
        scores["reference"] = reference_scores(stats, token_log_probs(ref_model, ref_tokenizer, texts, batch_size))
    return scores
