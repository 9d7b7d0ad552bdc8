"""The course's one implementation of its metrics: ROC, AUC, TPR at low FPR, perplexity, success rate.

Score convention everywhere: **higher = more likely positive** (member, poisoned, watermarked,
jailbroken). Every chapter scores its attacks and detectors through these functions, so "AUC" means the
same thing on every page.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from companion.checks import check_bool, check_choice, check_float, check_int, check_lm_and_tokenizer, check_texts, eager
from companion.train import pad_batch


def _as_1d_array(name: str, values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"{name} must be a 1-D sequence of numbers, got {type(values).__name__}")
    try:
        array = np.asarray(values)
    except ValueError as error:  # ragged nesting
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got a ragged sequence ({error})") from None
    if array.dtype == object:
        raise TypeError(f"{name} must be a 1-D sequence of numbers, got a sequence of mixed or non-numeric items")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold numbers, got dtype {array.dtype}")
    return array


def _check_binary_problem(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = _as_1d_array("labels", labels)
    scores = _as_1d_array("scores", scores).astype(np.float64)
    if len(labels) != len(scores):
        raise ValueError(f"labels and scores must have the same length, got {len(labels)} and {len(scores)}")
    if len(labels) == 0:
        raise ValueError("labels and scores must not be empty (both classes are needed)")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0/1 (or bool), got values {np.unique(labels)[:5].tolist()}")
    labels = labels.astype(np.int64)
    if labels.min() == labels.max():
        raise ValueError(f"labels must contain both classes, got only {int(labels[0])}s")
    if not np.isfinite(scores).all():
        raise ValueError(f"scores must be finite (no NaN or inf), got {int((~np.isfinite(scores)).sum())} "
                         f"non-finite of {len(scores)}")
    return labels, scores


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact ROC curve: one point per distinct score, ties handled (tied examples cross together).

    Returns ``(fpr, tpr, thresholds)``, starting at (0, 0) with threshold ``+inf``; the example is
    predicted positive when ``score >= threshold``. Equals scikit-learn's ``roc_curve`` with
    ``drop_intermediate=False``.
    """
    labels, scores = _check_binary_problem(labels, scores)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # the last index of each run of equal scores: thresholds sit between distinct values
    last_of_run = np.r_[np.nonzero(np.diff(sorted_scores))[0], len(sorted_scores) - 1]
    true_positives = np.cumsum(sorted_labels)[last_of_run]
    false_positives = (last_of_run + 1) - true_positives
    tpr = np.r_[0.0, true_positives / labels.sum()]
    fpr = np.r_[0.0, false_positives / (len(labels) - labels.sum())]
    thresholds = np.r_[np.inf, sorted_scores[last_of_run]]
    return fpr, tpr, thresholds


def auc(labels, scores) -> float:
    """Area under the ROC curve (trapezoidal over the exact curve, so ties count one half)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))


def tpr_at_fpr(labels, scores, fpr: float) -> float:
    """The highest TPR among thresholds whose FPR is at most ``fpr`` (Carlini et al. 2022's metric).

    With ``n`` negatives an FPR below ``1/n`` can only be met with no false positive at all, so a
    TPR at 0.1% FPR means something only with well over 1,000 negatives.
    """
    fpr = check_float("fpr", fpr, 0, 1, open_minimum=True, open_maximum=True)
    curve_fpr, curve_tpr, _ = roc_curve(labels, scores)
    return float(curve_tpr[curve_fpr <= fpr].max())


def advantage(labels, scores) -> float:
    """Membership advantage, max over thresholds of TPR - FPR (Yeom et al. 2018)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float((tpr - fpr).max())


# ---------------------------------------------------------------------------------------------
# Language-model losses
# ---------------------------------------------------------------------------------------------


def trained_context(model) -> int | None:
    """How many tokens ``model`` was trained to read at once: ``config.trained_context`` (set by the zoo,
    whose models train on 128-token windows although their position tables are longer), else the
    config's ``max_position_embeddings`` / ``n_positions`` (a Hugging Face model's own context)."""
    config = getattr(model, "config", None)
    for key in ("trained_context", "max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return value
    return None


def score_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Cut a text of ``n_tokens`` into ``(start, end, skip)`` windows that score every token once, each
    from within the trained ``context`` (the sliding-window evaluation of the Hugging Face perplexity
    guide; Press et al. 2021 call it "sliding window" inference).

    A window reads tokens ``[start, end)`` (at most ``context``) and predicts tokens ``start+1 .. end-1``;
    its first ``skip`` predictions were already scored by the previous window and are masked. Windows
    start every ``stride`` tokens, so every token after the first window is predicted from at least
    ``context - stride`` tokens of context. A text that fits is one window, ``(0, n_tokens, 0)``.
    """
    n_tokens = check_int("n_tokens", n_tokens, minimum=1)
    context = check_int("context", context, minimum=2)
    stride = check_int("stride", stride, minimum=1, maximum=context - 1)
    windows, start, scored_until = [], 0, 0  # tokens [1, scored_until) are scored
    while True:
        end = min(start + context, n_tokens)
        windows.append((start, end, max(0, scored_until - start - 1)))
        scored_until = end
        if end == n_tokens:
            return windows
        start += stride


def _check_texts(texts, batch_size) -> None:
    check_texts("texts", texts)
    check_int("batch_size", batch_size, minimum=1)


def _check_lm_call(model, tokenizer, texts, batch_size, stride=None) -> None:
    """The arguments of every LM loss: a causal LM, a tokenizer that fits it (and can pad), texts."""
    check_lm_and_tokenizer(model, tokenizer)
    _check_texts(texts, batch_size)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError("tokenizer must define a pad_token or an eos_token for batching")
    context = trained_context(model)
    if stride is not None:
        check_int("stride", stride, minimum=1, maximum=(context - 1) if context else None)


@eager(_check_lm_call)
def log_prob_batches(model, tokenizer, texts: list[str], batch_size: int = 32, stride: int | None = None):
    """Yield, per batch of scoring windows, the full next-token log-probabilities ``[B, T-1, V]``, the
    log-probability of each actual next token ``[B, T-1]``, the mask of the targets that count, and
    which text each row belongs to (``[B]``, indices into ``texts``).

    Every prediction is made within the model's :func:`trained_context`: a longer text is read in
    overlapping windows (:func:`score_windows`, ``stride`` defaulting to half the context) and each of
    its tokens is scored exactly once, so no position the model never trained on is ever scored.
    Windows are right-padded (causal attention never looks right, so padding cannot change a real
    token's prediction); padding and already-scored targets are masked. Every LM loss of the course
    reads this.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    context = trained_context(model)
    windows: list[tuple[int, list[int], int]] = []  # (text index, window ids, targets to skip)
    for index, text in enumerate(texts):
        ids = tokenizer(text, verbose=False)["input_ids"]
        if context is None or len(ids) <= context:
            windows.append((index, ids, 0))
            continue
        for start, end, skip in score_windows(len(ids), context, stride or context // 2):
            windows.append((index, ids[start:end], skip))
    for first in range(0, len(windows), batch_size):
        batch = windows[first: first + batch_size]
        ids, attention = pad_batch([w for _, w, _ in batch], pad_id)
        targets = attention.clone()
        for row, (_, _, skip) in enumerate(batch):
            targets[row, 1: 1 + skip] = 0  # tokens 1..skip were predicted by the previous window
        ids, attention = ids.to(device), attention.to(device)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        target_log_probs = log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)
        yield log_probs, target_log_probs, targets[:, 1:].to(device), torch.tensor([index for index, _, _ in batch])


@torch.no_grad()
def sequence_nll(model, tokenizer, texts: list[str], batch_size: int = 32, stride: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood (nats) and number of predicted tokens, per text.

    Each text is tokenised as the tokenizer does by default (our tokenizer prepends ``<|bos|>``);
    every token after the first is predicted from its prefix, within the model's trained context
    (longer texts are read in sliding windows, :func:`log_prob_batches`). Padding is masked out, so the
    result does not depend on ``batch_size`` or on what else is in the batch (up to float rounding).
    """
    _check_texts(texts, batch_size)
    sums = torch.zeros(len(texts), dtype=torch.float64)
    counts = torch.zeros(len(texts), dtype=torch.long)
    for _, target_log_probs, mask, rows in log_prob_batches(model, tokenizer, texts, batch_size, stride):
        target_mask = mask.to(target_log_probs.dtype)
        sums.index_add_(0, rows, -(target_log_probs * target_mask).sum(dim=1).cpu().double())
        counts.index_add_(0, rows, target_mask.sum(dim=1).long().cpu())
    return sums.float(), counts


@torch.no_grad()
def token_log_probs(model, tokenizer, texts: list[str], batch_size: int = 32, moments: bool = False
                    ) -> list[dict[str, torch.Tensor]]:
    """Per text, the log-probability of every predicted token (``"log_prob"``, length ``T-1``).

    With ``moments=True`` also the mean and standard deviation of ``log p(z | prefix)`` over the
    vocabulary ``z ~ p(. | prefix)`` at each position (``"mean"``, ``"std"``), which Min-K%++
    (Zhang et al. 2024, Eq. 2) needs. One forward pass per batch feeds every LM membership score.
    Texts longer than the trained context are read in sliding windows (:func:`log_prob_batches`).
    """
    check_texts("texts", texts, nonempty_each=True)
    _check_texts(texts, batch_size)
    check_bool("moments", moments)
    pieces: list[list[dict[str, torch.Tensor]]] = [[] for _ in texts]
    for log_probs, target_log_probs, mask, rows in log_prob_batches(model, tokenizer, texts, batch_size):
        if moments:
            probs = log_probs.exp()
            mean = (probs * log_probs).sum(-1)
            std = ((probs * log_probs**2).sum(-1) - mean**2).clamp_min(0).sqrt()
        for row, index in enumerate(rows.tolist()):
            keep = mask[row].bool()
            piece = {"log_prob": target_log_probs[row, keep].cpu()}
            if moments:
                piece["mean"], piece["std"] = mean[row, keep].cpu(), std[row, keep].cpu()
            pieces[index].append(piece)
    results = []
    for index, parts in enumerate(pieces):
        if sum(len(p["log_prob"]) for p in parts) == 0:
            raise ValueError(f"texts[{index}] = {texts[index]!r} tokenises to fewer than two "
                             "tokens, so no token of it is predicted; every text needs at least one")
        results.append({key: torch.cat([p[key] for p in parts]) for key in parts[0]})
    return results


def mean_token_loss(model, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Mean per-token NLL of each text: the LOSS attack's raw signal (lower = better known)."""
    nll, count = sequence_nll(model, tokenizer, texts, batch_size)
    if (count == 0).any():
        raise ValueError("every text must have at least two tokens to be scored")
    return nll / count


def perplexity(model, tokenizer, texts: list[str], batch_size: int = 32, stride: int | None = None) -> float:
    """Corpus perplexity, ``exp(total NLL / total predicted tokens)``, padding masked, every token
    predicted within the model's trained context (sliding windows of ``stride``, :func:`score_windows`)."""
    nll, count = sequence_nll(model, tokenizer, texts, batch_size, stride)
    if count.sum() == 0:
        raise ValueError("texts contain no token to predict")
    return math.exp(nll.sum().item() / count.sum().item())


# ---------------------------------------------------------------------------------------------
# Intervals for rates
# ---------------------------------------------------------------------------------------------

INTERVAL_METHODS = ("wilson", "clopper-pearson")


def rate_interval(successes: int, trials: int, confidence: float = 0.95, method: str = "wilson") -> tuple[float, float]:
    """A confidence interval for a rate observed as ``successes`` of ``trials``.

    ``"wilson"`` (Wilson 1927): the score interval, good coverage even for small ``trials`` and rates
    near 0 or 1; ``"clopper-pearson"`` (Clopper & Pearson 1934): the exact binomial interval, never
    below its nominal coverage, wider. Every rate the course reports comes with one of these.
    """
    successes = check_int("successes", successes, minimum=0)
    trials = check_int("trials", trials, minimum=1)
    if successes > trials:
        raise ValueError(f"successes must be <= trials, got {successes} > {trials}")
    confidence = check_float("confidence", confidence, 0, 1, open_minimum=True, open_maximum=True)
    check_choice("method", method, INTERVAL_METHODS)
    from scipy import stats

    if method == "clopper-pearson":
        alpha = 1 - confidence
        low = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, trials - successes + 1))
        high = 1.0 if successes == trials else float(stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
        return low, high
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / trials
    denominator = 1 + z**2 / trials
    centre = (p + z**2 / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z**2 / (4 * trials**2)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def rate_difference(successes_a: int, trials_a: int, successes_b: int, trials_b: int,
                    confidence: float = 0.95) -> tuple[float, float, float]:
    """The difference of two independent rates, ``k_a/n_a - k_b/n_b``, with its confidence interval
    ``(difference, low, high)``: Newcombe's hybrid score interval (Newcombe 1998, method 10), built
    from the two Wilson intervals of :func:`rate_interval`. Use it to report an attack as a *margin*
    over its control (a random suffix at the same budget), not as a bare rate."""
    for label, k, n in (("a", successes_a, trials_a), ("b", successes_b, trials_b)):
        check_int(f"successes_{label}", k, minimum=0)
        check_int(f"trials_{label}", n, minimum=1)
        if k > n:
            raise ValueError(f"successes_{label} must be <= trials_{label}, got {k} > {n}")
    confidence = check_float("confidence", confidence, 0, 1, open_minimum=True, open_maximum=True)
    return _newcombe_difference(successes_a, trials_a, successes_b, trials_b, confidence)


def _newcombe_difference(k_a: int, n_a: int, k_b: int, n_b: int, confidence: float, phi: float = 0.0
                         ) -> tuple[float, float, float]:
    """Newcombe's hybrid score interval for ``k_a/n_a - k_b/n_b`` from the two Wilson intervals, with the
    correlation ``phi`` of paired outcomes (0 for independent samples; Newcombe 1998, method 10)."""
    low_a, high_a = rate_interval(k_a, n_a, confidence)
    low_b, high_b = rate_interval(k_b, n_b, confidence)
    p_a, p_b = k_a / n_a, k_b / n_b
    difference = p_a - p_b
    d_low = (p_a - low_a) ** 2 - 2 * phi * (p_a - low_a) * (high_b - p_b) + (high_b - p_b) ** 2
    d_high = (high_a - p_a) ** 2 - 2 * phi * (high_a - p_a) * (p_b - low_b) + (p_b - low_b) ** 2
    low = difference - math.sqrt(max(d_low, 0.0))
    high = difference + math.sqrt(max(d_high, 0.0))
    return difference, max(-1.0, low), min(1.0, high)


def paired_rate_difference(hits_a, hits_b, confidence: float = 0.95) -> tuple[float, float, float]:
    """The difference of two *paired* rates (the same trials under two conditions: one attack per holder
    with method A and with method B), ``mean(hits_a) - mean(hits_b)``, with its confidence interval
    ``(difference, low, high)``: Newcombe's score interval for paired data (Newcombe 1998, "Improved
    confidence intervals for the difference between binomial proportions based on paired data",
    method 10), the two Wilson intervals of :func:`rate_interval` combined with the observed correlation
    ``phi`` of the pairs. With ``phi = 0`` it is :func:`rate_difference`; pairs that agree narrow it."""
    a = _as_1d_array("hits_a", hits_a)
    b = _as_1d_array("hits_b", hits_b)
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"hits_a and hits_b must be non-empty and paired (equal lengths), got {len(a)} and {len(b)}")
    for label, x in (("hits_a", a), ("hits_b", b)):
        if not np.isin(x, (0, 1)).all():
            raise ValueError(f"{label} must hold 0/1 (or boolean) outcomes, got values {sorted(set(x.tolist()))[:5]}")
    confidence = check_float("confidence", confidence, 0, 1, open_minimum=True, open_maximum=True)
    a, b = a.astype(bool), b.astype(bool)
    n = len(a)
    both, only_a, only_b = int(np.sum(a & b)), int(np.sum(a & ~b)), int(np.sum(~a & b))
    neither = n - both - only_a - only_b
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = 0.0 if margins == 0 else (both * neither - only_a * only_b) / math.sqrt(margins)
    return _newcombe_difference(both + only_a, n, both + only_b, n, confidence, phi)


@dataclass(frozen=True)
class RateEstimate:
    """A rate observed as ``successes`` of ``trials``, with its ``confidence`` interval ``[low, high]``
    (:func:`rate_interval`, by ``method``). ``float(estimate)`` is the point estimate ``k / n``."""

    successes: int
    trials: int
    low: float
    high: float
    confidence: float = 0.95
    method: str = "wilson"

    @property
    def rate(self) -> float:
        return self.successes / self.trials

    def __float__(self) -> float:
        return self.rate

    def __str__(self) -> str:
        digits = ".1%" if self.trials >= 100 else ".0%"
        return (f"{self.successes}/{self.trials} ({self.rate:{digits}}, {self.confidence:.0%} CI "
                f"{self.low:{digits}}–{self.high:{digits}})")


def estimate_rate(successes: int, trials: int, confidence: float = 0.95, method: str = "wilson") -> RateEstimate:
    """``successes`` of ``trials`` as a :class:`RateEstimate` with its interval (:func:`rate_interval`)."""
    low, high = rate_interval(successes, trials, confidence, method)
    return RateEstimate(int(successes), int(trials), low, high, float(confidence), method)


def attack_success_rate(successes, confidence: float = 0.95, method: str = "wilson") -> RateEstimate:
    """The attack success rate of a list of attempts (booleans or 0/1): the count of successes of the
    attempts, with its interval, never a bare percentage (the course's rule for every rate)."""
    array = _as_1d_array("successes", successes)
    if len(array) == 0:
        raise ValueError("successes must not be empty")
    if not np.isin(array, (0, 1)).all():
        raise ValueError(f"successes must be booleans or 0/1, got values {np.unique(array)[:5].tolist()}")
    return estimate_rate(int(array.sum()), len(array), confidence, method)


# ---------------------------------------------------------------------------------------------
# One summary of an attack (or detector): AUC, advantage and TPR at low FPR with counts
# ---------------------------------------------------------------------------------------------

#: A TPR at FPR ``f`` rests on the negatives scored above the threshold; with fewer than ``10 / f``
#: negatives there are fewer than 10 false positives at the operating point, so the FPR itself (and
#: the threshold it picks) is not measured: the course's rule, flagged by :func:`summary`.
NEGATIVES_PER_FPR = 10


@dataclass(frozen=True)
class OperatingPoint:
    """The ROC point that :func:`tpr_at_fpr` picks for ``target_fpr``: the highest TPR among thresholds
    whose FPR is at most ``target_fpr`` (an example is positive when ``score >= threshold``; ``inf``:
    none is). ``tpr`` counts its true positives of all positives, with an interval; the point's own
    FPR is ``false_positives / negatives``. ``resolvable`` is False when there are fewer than
    ``needed_negatives = 10 / target_fpr`` negatives: report such a TPR as unmeasured, or flag it."""

    target_fpr: float
    tpr: RateEstimate
    false_positives: int
    negatives: int
    threshold: float
    needed_negatives: int

    @property
    def fpr(self) -> float:
        return self.false_positives / self.negatives

    @property
    def resolvable(self) -> bool:
        return self.negatives >= self.needed_negatives


def fpr_label(fpr: float) -> str:
    """``0.01 -> "TPR@1%"``, ``0.001 -> "TPR@0.1%"``: the column name of a TPR at low FPR."""
    fpr = check_float("fpr", fpr, 0, 1, open_minimum=True, open_maximum=True)
    return f"TPR@{100 * fpr:g}%"


@dataclass(frozen=True)
class Summary:
    """What :func:`summary` measured: AUC, advantage, class counts and one :class:`OperatingPoint`
    per requested FPR. ``row()`` is the flat table row (AUC, advantage, TPR@...%)."""

    auc: float
    advantage: float
    positives: int
    negatives: int
    points: tuple[OperatingPoint, ...]

    def at(self, fpr: float) -> OperatingPoint:
        """The operating point of target FPR ``fpr`` (one of those the summary was computed for)."""
        for point in self.points:
            if point.target_fpr == fpr:
                return point
        raise ValueError(f"fpr must be one of the summary's FPRs {tuple(p.target_fpr for p in self.points)}, "
                         f"got {fpr!r}")

    @property
    def unresolved(self) -> tuple[float, ...]:
        """The target FPRs with fewer than ``10 / FPR`` negatives."""
        return tuple(p.target_fpr for p in self.points if not p.resolvable)

    def row(self) -> dict[str, float]:
        return {"AUC": self.auc, "advantage": self.advantage,
                **{fpr_label(p.target_fpr): p.tpr.rate for p in self.points}}


def _check_fprs(fprs) -> tuple[float, ...]:
    if isinstance(fprs, (str, bytes)) or not isinstance(fprs, (tuple, list)) or not fprs:
        raise TypeError(f"fprs must be a non-empty tuple of false-positive rates, got {type(fprs).__name__}"
                        f"{' (empty)' if isinstance(fprs, (tuple, list)) else ''}")
    return tuple(check_float(f"fprs[{i}]", f, 0, 1, open_minimum=True, open_maximum=True) for i, f in enumerate(fprs))


def summary(labels, scores, fprs=(0.01, 0.001), confidence: float = 0.95, method: str = "wilson") -> Summary:
    """One attack's (or detector's) evaluation: AUC, advantage (Yeom et al. 2018), and for each FPR in
    ``fprs`` the TPR of :func:`tpr_at_fpr` (Carlini et al. 2022's low-FPR metric) as a count of the
    positives, with a ``confidence`` interval (``method``: Wilson or Clopper-Pearson,
    :func:`rate_interval`), the false positives at that point, and whether the FPR is resolvable
    (at least ``10 / FPR`` negatives). Higher score = more likely positive.
    """
    fprs = _check_fprs(fprs)
    confidence = check_float("confidence", confidence, 0, 1, open_minimum=True, open_maximum=True)
    check_choice("method", method, INTERVAL_METHODS)
    labels, scores = _check_binary_problem(labels, scores)
    curve_fpr, curve_tpr, thresholds = roc_curve(labels, scores)
    positives, negatives = int(labels.sum()), int(len(labels) - labels.sum())
    points = []
    for fpr in fprs:
        allowed = np.nonzero(curve_fpr <= fpr)[0]  # tpr_at_fpr's rule; (0, 0) at +inf is always allowed
        best = allowed[np.argmax(curve_tpr[allowed])]  # the first (lowest-FPR) point of the highest TPR
        true_positives = int(round(curve_tpr[best] * positives))
        false_positives = int(round(curve_fpr[best] * negatives))
        points.append(OperatingPoint(fpr, estimate_rate(true_positives, positives, confidence, method),
                                     false_positives, negatives, float(thresholds[best]),
                                     math.ceil(NEGATIVES_PER_FPR / fpr - 1e-9)))
    return Summary(auc(labels, scores), advantage(labels, scores), positives, negatives, tuple(points))


# ---------------------------------------------------------------------------------------------
# Intervals for pooled, correlated membership games: a bootstrap over examples
# ---------------------------------------------------------------------------------------------

#: Replicates are drawn this many at a time (the draws depend on it, so it is fixed).
_BOOTSTRAP_CHUNK = 32


@dataclass(frozen=True)
class BootstrapEstimate:
    """A statistic on the data as given (``estimate``) and its ``confidence`` percentile-bootstrap
    interval ``[low, high]``; ``samples`` holds the statistic of every replicate. ``pairing`` names the
    resampling (seed, number of replicates, a fingerprint of the groups): two estimates with the same
    ``pairing`` were computed on the same resampled examples, so their replicate differences form a
    paired bootstrap (:func:`paired_difference`)."""

    estimate: float
    low: float
    high: float
    samples: np.ndarray
    confidence: float
    pairing: tuple

    def __str__(self) -> str:
        return f"{self.estimate:.4g} ({self.confidence:.0%} bootstrap CI {self.low:.4g}–{self.high:.4g})"


@dataclass(frozen=True)
class BootstrapSummary:
    """What :func:`bootstrap_summary` measured: the AUC and, per requested FPR, the TPR of
    :func:`tpr_at_fpr`, each a :class:`BootstrapEstimate`; ``groups`` resampled units (examples),
    ``n_resamples`` replicates."""

    auc: BootstrapEstimate
    points: tuple[tuple[float, BootstrapEstimate], ...]
    groups: int
    n_resamples: int

    def at(self, fpr: float) -> BootstrapEstimate:
        """The TPR estimate at target FPR ``fpr`` (one of those the summary was computed for)."""
        for target, estimate in self.points:
            if target == fpr:
                return estimate
        raise ValueError(f"fpr must be one of the summary's FPRs {tuple(t for t, _ in self.points)}, got {fpr!r}")


def _percentile_estimate(full: float, samples: np.ndarray, confidence: float, pairing: tuple) -> BootstrapEstimate:
    """``full`` with the percentile interval of the finite replicate ``samples`` (a replicate without both
    classes is NaN and left out)."""
    tail = (1 - confidence) / 2
    low, high = np.quantile(samples[np.isfinite(samples)], [tail, 1 - tail])
    return BootstrapEstimate(float(full), float(low), float(high), samples, confidence, pairing)


def _weighted_curves(sorted_labels: np.ndarray, last_of_run: np.ndarray, weights: np.ndarray, fprs):
    """AUC and TPR at each FPR of ``[R, rows]`` weighted copies of one sorted problem (rows sorted by
    decreasing score; ``last_of_run`` the last row of each run of equal scores). Weighted counts
    replace counts; the rest is :func:`roc_curve`, :func:`auc` and :func:`tpr_at_fpr` row by row.
    Replicates without a positive or a negative give NaN."""
    positive = np.cumsum(weights * sorted_labels, axis=1)[:, last_of_run]
    negative = np.cumsum(weights * (1 - sorted_labels), axis=1)[:, last_of_run]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = positive / positive[:, -1:]
        fpr = negative / negative[:, -1:]
    zeros = np.zeros((len(weights), 1))
    tpr, fpr = np.hstack([zeros, tpr]), np.hstack([zeros, fpr])
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    areas = trapezoid(tpr, fpr, axis=1)
    rows = np.arange(len(weights))
    # both rates rise along the curve: the highest TPR with FPR <= f is the TPR at the last such point
    at = [tpr[rows, (fpr <= f).sum(1) - 1] for f in fprs]
    bad = (positive[:, -1] == 0) | (negative[:, -1] == 0)
    areas[bad] = np.nan
    for values in at:
        values[bad] = np.nan
    return areas, at


def bootstrap_summary(labels, scores, groups=None, fprs=(0.01, 0.001), n_resamples: int = 1000,
                      confidence: float = 0.95, seed: int = 0) -> BootstrapSummary:
    """Percentile-bootstrap intervals (Efron & Tibshirani 1993, ch. 13) of an attack's AUC and of its
    TPR at each FPR in ``fprs``, resampling ``groups`` (e.g. the example each row scores), not rows.

    Why groups: pooled membership games (:func:`companion.mia.pooled_leave_one_out`) score the *same*
    examples in every game, so their rows are not independent trials: an example that is easy to
    recognise is recognised in every game it is a member of. A Wilson interval of the pooled count
    treats each row as a fresh coin and is too narrow. Here each replicate draws as many groups as
    there are, uniformly with replacement, and carries *all* rows of each drawn group (a group drawn
    twice counts twice); the ROC is recomputed on the replicate, so the threshold of each operating
    point is re-chosen, and the statistic is that of :func:`summary` (:func:`tpr_at_fpr`'s rule, ties
    crossing together). ``groups=None`` makes every row its own group (the ordinary bootstrap).

    Deterministic: ``numpy.random.default_rng(seed)`` draws the replicates. Two calls with the same
    ``seed``, ``n_resamples`` and set of group labels resample the same groups, so the differences of
    their replicates are a paired bootstrap of the difference (:func:`paired_difference`). Replicates
    that draw no positive or no negative are left out of the interval (they happen only with very few
    groups; more than 10% of them is an error). It does not measure what retraining would change (another seed, other shadow models).
    """
    fprs = _check_fprs(fprs)
    labels, scores = _check_binary_problem(labels, scores)
    if groups is None:
        group_ids = np.arange(len(labels))
    else:
        group_ids = _as_1d_array("groups", groups)
        if len(group_ids) != len(labels):
            raise ValueError(f"groups must have one entry per score ({len(labels)}), got {len(group_ids)}")
        if group_ids.dtype.kind not in "biu":
            raise TypeError(f"groups must hold integer labels (e.g. example indices), got dtype {group_ids.dtype}")
    n_resamples = check_int("n_resamples", n_resamples, minimum=100)
    confidence = check_float("confidence", confidence, 0, 1, open_minimum=True, open_maximum=True)
    seed = check_int("seed", seed, minimum=0)
    unique, inverse = np.unique(group_ids, return_inverse=True)
    n_groups = len(unique)
    if n_groups < 2:
        raise ValueError(f"groups must hold at least 2 distinct labels to resample, got {n_groups}")
    order = np.argsort(-scores, kind="mergesort")
    sorted_labels, sorted_groups = labels[order].astype(np.float64), inverse[order]
    last_of_run = np.r_[np.nonzero(np.diff(scores[order]))[0], len(scores) - 1]

    full_auc, full_at = _weighted_curves(sorted_labels, last_of_run, np.ones((1, len(scores))), fprs)
    rng = np.random.default_rng(seed)
    auc_samples, at_samples = [], [[] for _ in fprs]
    for start in range(0, n_resamples, _BOOTSTRAP_CHUNK):
        draws = rng.integers(0, n_groups, size=(min(_BOOTSTRAP_CHUNK, n_resamples - start), n_groups))
        counts = np.stack([np.bincount(d, minlength=n_groups) for d in draws]).astype(np.float64)
        areas, at = _weighted_curves(sorted_labels, last_of_run, counts[:, sorted_groups], fprs)
        auc_samples.append(areas)
        for kept, values in zip(at_samples, at):
            kept.append(values)
    pairing = (seed, n_resamples, zlib.crc32(unique.astype(np.int64).tobytes()))

    def estimate(full: float, parts: list) -> BootstrapEstimate:
        samples = np.concatenate(parts)
        if np.isfinite(samples).sum() < 0.9 * n_resamples:
            raise ValueError(f"groups: too few replicates hold both classes ({np.isfinite(samples).sum()} of "
                             f"{n_resamples}); resample more groups")
        return _percentile_estimate(full, samples, confidence, pairing)

    return BootstrapSummary(estimate(full_auc[0], auc_samples),
                            tuple((f, estimate(v[0], s)) for f, v, s in zip(fprs, full_at, at_samples)),
                            n_groups, n_resamples)


def paired_difference(a: BootstrapEstimate, b: BootstrapEstimate) -> BootstrapEstimate:
    """``a - b`` with the percentile interval of the replicate differences: a paired bootstrap, valid
    when both were computed on the same resampled examples (the same ``pairing``: same seed, number of
    replicates and groups in :func:`bootstrap_summary`). An interval that excludes 0 separates them."""
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, BootstrapEstimate):
            raise TypeError(f"{name} must be a BootstrapEstimate (from bootstrap_summary), got {type(value).__name__}")
    if a.pairing != b.pairing or a.confidence != b.confidence:
        raise ValueError("a and b must come from the same resampling (seed, n_resamples, groups and confidence), "
                         f"got pairings {a.pairing[:2]} and {b.pairing[:2]}")
    return _percentile_estimate(a.estimate - b.estimate, a.samples - b.samples, a.confidence, a.pairing)
