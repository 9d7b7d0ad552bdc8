"""Membership inference: one score per example, **higher = more likely a member**.

Attacks without shadow models:

- on a classifier: correctness (Yeom et al. 2018's gap attack), LOSS (Yeom et al. 2018), confidence, entropy and modified entropy (Song & Mittal
  2021, Eq. 8);
- on a language model: LOSS / perplexity, the zlib ratio (Carlini et al. 2021, Sec. 5.2), Min-K%
  (Shi et al. 2024, Eq. 1), Min-K%++ (Zhang et al. 2024, Eq. 2) and reference-model calibration
  (Carlini et al. 2021; Mireshghallah et al. 2022). All of them read one forward pass per text,
  :func:`companion.metrics.token_log_probs`.

Attacks with shadow models (one ``ShadowSignals`` of K models, each trained on a random half, feeds
all three): Shokri et al. (2017)'s attack model, LiRA online and offline (Carlini et al. 2022) and RMIA
(Zarifzadeh et al. 2024). The K models are trained together with ``torch.func.vmap``.

Evaluate every score with :mod:`companion.metrics` (``auc``, ``tpr_at_fpr``, ``roc_curve``).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from companion.checks import (check_bool, check_classifier_data, check_float, check_int, check_labels,
                              check_lm_and_tokenizer, check_positive_float, check_tensor, check_texts)
from companion import zoo
from companion.metrics import token_log_probs
from companion.train import sampled_minibatches, train_stacked_models

# ---------------------------------------------------------------------------------------------
# Classifier attacks
# ---------------------------------------------------------------------------------------------


def _check_classifier_inputs(model, x, y) -> None:
    check_classifier_data(model, x, y)


def _label_index(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's label as a gather index broadcast to ``values`` (``[..., N, C]`` -> ``[..., N, 1]``)."""
    check_tensor("logits", values, kind="float", finite=True)
    check_labels("labels", labels, values.shape[-1])
    if values.ndim < 2 or values.shape[-2] != len(labels):
        raise ValueError(f"labels must have one entry per example of the [..., N, C] values ({tuple(values.shape)}), "
                         f"got {len(labels)}")
    return labels.view(*([1] * (values.ndim - 2)), -1, 1).expand(*values.shape[:-1], 1)


def _at_label(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``values[..., n, labels[n]]``: the entry of each example's true class."""
    return values.gather(-1, _label_index(values, labels)).squeeze(-1)


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
    return _at_label(probs, y).clamp_min(1e-30).log()


def correctness_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Yeom et al. (2018)'s gap attack: ``1`` when the model classifies ``x`` correctly (guess
    "member"), else ``0``. Its advantage is the gap between training and test accuracy; with only two
    score values its ROC has a single operating point."""
    _check_classifier_inputs(model, x, y)
    return (_probabilities(model, x).argmax(-1) == y).float()


def confidence_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The probability of the true class, ``f(x)_y``."""
    _check_classifier_inputs(model, x, y)
    return _at_label(_probabilities(model, x), y)


def entropy_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Negative prediction entropy (members get confident predictions); needs no label."""
    if y is None:
        y = torch.zeros(len(x) if isinstance(x, torch.Tensor) else 0, dtype=torch.int64)
    _check_classifier_inputs(model, x, y)
    probs = _probabilities(model, x)
    return (probs * probs.clamp_min(1e-30).log()).sum(1)


def modified_entropy_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Negative modified entropy (Song & Mittal 2021, Eq. 8), which uses the label:
    ``Mentr = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)``; low for confident, correct predictions."""
    _check_classifier_inputs(model, x, y)
    p = _probabilities(model, x).clamp(1e-30, 1 - 1e-7)
    p_y = _at_label(p, y)
    others = -(p * (1 - p).log())
    others = others.sum(1) - _at_label(others, y)
    return -(-(1 - p_y) * p_y.log() + others)


# ---------------------------------------------------------------------------------------------
# Language-model attacks
# ---------------------------------------------------------------------------------------------


def _check_k(k) -> float:
    return check_float("k", k, 0, 1, open_minimum=True)


def _check_stats(stats, name: str = "stats", moments: bool = False) -> list:
    """What :func:`companion.metrics.token_log_probs` returns: a non-empty list of dicts whose
    ``"log_prob"`` is a non-empty, finite 1-D float tensor (one entry per predicted token), with
    ``"mean"`` and ``"std"`` of the same length when ``moments``."""
    if not isinstance(stats, list) or not stats:
        raise TypeError(f"{name} must be a non-empty list of token_log_probs entries, got {type(stats).__name__}")
    for i, entry in enumerate(stats):
        if not isinstance(entry, dict) or "log_prob" not in entry:
            raise TypeError(f"{name}[{i}] must be a dict with a 'log_prob' tensor (from token_log_probs), "
                            f"got {type(entry).__name__}")
        check_tensor(f"{name}[{i}]['log_prob']", entry["log_prob"], ndim=1, kind="float", finite=True, nonempty=True)
        if moments:
            if "mean" not in entry or "std" not in entry:
                raise ValueError(f"{name}: min_k_plus_plus_scores needs token statistics computed with moments=True")
            for key in ("mean", "std"):
                check_tensor(f"{name}[{i}]['{key}']", entry[key], ndim=1, kind="float", finite=True)
                if entry[key].shape != entry["log_prob"].shape:
                    raise ValueError(f"{name}[{i}]['{key}'] must match 'log_prob' in shape, "
                                     f"got {tuple(entry[key].shape)} and {tuple(entry['log_prob'].shape)}")
    return stats


def _lowest_fraction_mean(values: torch.Tensor, k: float) -> float:
    if values.numel() == 0 or not bool(torch.isfinite(values).all()):
        raise ValueError("stats: every entry needs at least one predicted token with a finite log-probability, "
                         f"got {values.numel()} values ({int((~torch.isfinite(values)).sum())} non-finite)")
    n = max(1, int(len(values) * k))
    return float(values.sort().values[:n].mean())


def lm_loss_scores(stats: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """LOSS on an LM: minus the mean token NLL (``-log perplexity``) of each text."""
    _check_stats(stats)
    return torch.tensor([float(s["log_prob"].mean()) for s in stats])


def min_k_scores(stats: list[dict[str, torch.Tensor]], k: float = 0.2) -> torch.Tensor:
    """Min-K% Prob (Shi et al. 2024, Eq. 1): the mean log-probability of the ``k`` fraction of tokens
    with the lowest log-probability. A member text has few very surprising tokens."""
    k = _check_k(k)
    _check_stats(stats)
    return torch.tensor([_lowest_fraction_mean(s["log_prob"], k) for s in stats])


def min_k_plus_plus_scores(stats: list[dict[str, torch.Tensor]], k: float = 0.2) -> torch.Tensor:
    """Min-K%++ (Zhang et al. 2024, Eq. 2): standardise each token's log-probability by the mean and
    standard deviation of ``log p(z | prefix)`` under the model's own next-token distribution, then take
    the mean of the lowest ``k`` fraction. Needs ``token_log_probs(..., moments=True)``."""
    k = _check_k(k)
    _check_stats(stats, moments=True)
    return torch.tensor([_lowest_fraction_mean((s["log_prob"] - s["mean"]) / s["std"].clamp_min(1e-6), k)
                         for s in stats])


def zlib_scores(stats: list[dict[str, torch.Tensor]], texts: list[str]) -> torch.Tensor:
    """The zlib ratio (Carlini et al. 2021, Sec. 5.2): the text's log-perplexity over its zlib entropy,
    as a score ``mean_t log p(x_t | x_<t) / len(zlib.compress(text))`` (bytes), the form of the Min-K%
    reference code (``ll / zlib_len`` with ``ll`` minus the mean token loss). Dividing by the
    compressed length discounts texts that any model finds easy because they are merely repetitive."""
    if isinstance(stats, list) and isinstance(texts, list) and len(stats) != len(texts):
        raise ValueError(f"stats and texts must have the same length, got {len(stats)} and {len(texts)}")
    _check_stats(stats)
    check_texts("texts", texts, nonempty_each=True)
    return torch.tensor([float(s["log_prob"].mean()) / len(zlib.compress(t.encode("utf-8")))
                         for s, t in zip(stats, texts)])


def reference_scores(target_stats: list[dict[str, torch.Tensor]], reference_stats: list[dict[str, torch.Tensor]]
                     ) -> torch.Tensor:
    """Reference-model calibration: the target's mean token log-likelihood minus a reference model's
    (trained on other data from the same distribution). It removes how *easy* a text is for any model."""
    if isinstance(target_stats, list) and isinstance(reference_stats, list) and len(target_stats) != len(reference_stats):
        raise ValueError(f"target_stats and reference_stats must have the same length, "
                         f"got {len(target_stats)} and {len(reference_stats)}")
    _check_stats(target_stats, "target_stats")
    _check_stats(reference_stats, "reference_stats")
    return lm_loss_scores(target_stats) - lm_loss_scores(reference_stats)


def lm_scores(model, tokenizer, texts: list[str], k: float = 0.2, reference=None, batch_size: int = 32
              ) -> dict[str, torch.Tensor]:
    """Every LM membership score of this module from one forward pass per text (and one of the
    reference model, given as a :class:`companion.zoo.ZooModel` or a ``(model, tokenizer)`` pair)."""
    k = _check_k(k)
    if isinstance(reference, zoo.ZooModel):
        reference = (reference.model, reference.tokenizer)
    if reference is not None:
        if not isinstance(reference, tuple) or len(reference) != 2:
            raise TypeError(f"reference must be None, a ZooModel or a (model, tokenizer) tuple, got "
                            f"{type(reference).__name__}")
        check_lm_and_tokenizer(*reference)
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


# ---------------------------------------------------------------------------------------------
# Shadow models: many models of the same recipe, each trained on a random half of the data
# ---------------------------------------------------------------------------------------------


@dataclass
class ShadowSignals:
    """What K shadow (or reference) models say about N examples.

    ``logits``: ``[K, N, C]`` raw outputs; ``keep[k, n]``: whether example ``n`` was in model ``k``'s
    training set; ``labels``: ``[N]``. ``scaled_confidence()`` gives LiRA's statistic.
    """

    logits: torch.Tensor
    keep: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        check_tensor("logits", self.logits, ndim=3, kind="float", finite=True, nonempty=True)
        check_tensor("keep", self.keep, ndim=2, kind="bool")
        if self.keep.shape != self.logits.shape[:2]:
            raise ValueError(f"keep must be [K, N] = {list(self.logits.shape[:2])} like logits, "
                             f"got {list(self.keep.shape)}")
        check_labels("labels", self.labels, self.logits.shape[-1])
        if len(self.labels) != self.logits.shape[1]:
            raise ValueError(f"labels must have N = {self.logits.shape[1]} entries, got {len(self.labels)}")

    def scaled_confidence(self) -> torch.Tensor:
        return scaled_confidence(self.logits, self.labels)

    def true_class_probs(self) -> torch.Tensor:
        return _at_label(torch.softmax(self.logits.float(), -1), self.labels)


def scaled_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LiRA's logit-scaled confidence (Carlini et al. 2022, Sec. IV-B):
    ``phi = log(p_y / (1 - p_y)) = z_y - logsumexp_{j != y} z_j``, computed stably from the logits
    (``[..., N, C]`` with labels ``[N]``), so it stays finite when ``p_y`` rounds to 1."""
    check_tensor("logits", logits)
    logits = logits.float()
    index = _label_index(logits, labels)
    true = logits.gather(-1, index).squeeze(-1)
    others = logits.scatter(-1, index, float("-inf")).logsumexp(-1)
    return true - others


def balanced_keep(n_models: int, n_examples: int, seed: int = 0) -> torch.Tensor:
    """``[K, N]`` membership of each example in each model: every example is in exactly half of the
    models (as in Carlini et al.'s LiRA code), so every example has IN and OUT models to compare."""
    n_models = check_int("n_models", n_models, minimum=2)
    n_examples = check_int("n_examples", n_examples, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(n_models, n_examples, generator=generator).argsort(0)
    return order < n_models // 2


def check_shadow_setup(make_model, x: torch.Tensor, keep: torch.Tensor, batch_size: int, epochs: int = 1,
                       lr: float = 1e-3, seed: int = 0, vectorized: bool = True) -> None:
    """The arguments every shadow-model trainer shares (this module's and ``companion.dp``'s):
    a model factory, a ``[n_models, len(x)]`` bool keep mask, at least ``batch_size`` examples each,
    and the recipe (``epochs >= 1``, a finite ``lr > 0``, ``seed >= 0``, a bool ``vectorized``)."""
    if isinstance(make_model, nn.Module) or not callable(make_model):
        raise TypeError(f"make_model must be a function returning a fresh nn.Module, got {type(make_model).__name__}")
    check_tensor("x", x, kind="float", finite=True, nonempty=True)
    check_int("epochs", epochs, minimum=1)
    check_positive_float("lr", lr)
    check_int("seed", seed, minimum=0)
    check_bool("vectorized", vectorized)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.ndim != 2 or keep.shape[1] != len(x):
        raise ValueError(f"keep must be a bool tensor [n_models, {len(x)}], got {getattr(keep, 'shape', keep)}")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    if (keep.sum(1) < batch_size).any():
        raise ValueError(f"every model needs at least batch_size={batch_size} training examples, "
                         f"got as few as {int(keep.sum(1).min())}")


def train_shadow_models(make_model, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, epochs: int = 60,
                        batch_size: int = 64, lr: float = 1e-3, seed: int = 0, vectorized: bool = True
                        ) -> ShadowSignals:
    """Train K models of ``make_model()``'s architecture, model ``k`` on the examples with
    ``keep[k]``, and return their outputs on all of ``x``.

    The recipe is ordinary Adam on minibatches of ``batch_size`` drawn from each model's own half
    (:func:`companion.train.sampled_minibatches`, seeded with ``seed + 1``), for ``epochs`` passes over
    the mean shadow-set size; the weights start from ``torch.manual_seed(seed)``. The K models are
    trained together by :func:`companion.train.train_stacked_models`: ``vectorized=True`` stacks their
    parameters and ``vmap``s the forward and backward passes, ``vectorized=False`` is the model-by-model
    reference with the same arithmetic.
    """
    check_shadow_setup(make_model, x, keep, batch_size, epochs, lr, seed, vectorized)
    steps = epochs * int(keep.sum(1).float().mean().item()) // batch_size
    schedule = sampled_minibatches(keep, batch_size, steps, seed + 1)
    logits = train_stacked_models(make_model, len(keep), x, y, schedule, lr, seed=seed, vectorized=vectorized)
    return ShadowSignals(logits=logits, keep=keep.clone(), labels=y.clone())


# ---------------------------------------------------------------------------------------------
# LiRA, RMIA and Shokri et al.'s attack model
# ---------------------------------------------------------------------------------------------


def _normal_logpdf(value, mean, std):
    return -0.5 * ((value - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)


#: What ``lira_scores(..., fixed_variance=...)`` accepts besides ``False`` (per-example variances).
FIXED_VARIANCES = (True, "median", "global")


def lira_scores(shadow: ShadowSignals, target_logits: torch.Tensor, online: bool = True,
                fixed_variance: bool | str = False) -> torch.Tensor:
    """The Likelihood Ratio Attack (Carlini et al. 2022, Algorithm 1).

    For each example, fit Gaussians to the shadow models' scaled confidences when the example was IN
    their training set and when it was OUT (per-example means), and score the target model's
    confidence ``phi``: online ``log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2)``; offline
    (OUT models only) the one-sided ``log Pr[Z < phi]``, ``Z ~ N(mu_out, s_out^2)``.

    ``fixed_variance`` (better with few shadow models) shares one standard deviation across examples:
    ``True`` or ``"median"``, the median over examples of the per-example standard deviations (this
    course's default, one per distribution); ``"global"``, the reference code's ``fix_variance``
    (``research/mi_lira_2021/plot.py``): the standard deviation of *all* examples' IN values pooled
    (OUT values offline), around their grand mean, so it includes the spread between examples, used
    for both Gaussians. (The reference code also centres each Gaussian on the median, not the mean,
    of the example's values.)
    """
    if not isinstance(shadow, ShadowSignals):
        raise TypeError(f"shadow must be a ShadowSignals, got {type(shadow).__name__}")
    check_tensor("target_logits", target_logits, kind="float", finite=True)
    check_bool("online", online)
    if fixed_variance is not False and not any(type(fixed_variance) is type(c) and fixed_variance == c
                                               for c in FIXED_VARIANCES):
        raise ValueError(f"fixed_variance must be False, True, 'median' or 'global', got {fixed_variance!r}")
    if target_logits.shape != shadow.logits.shape[1:]:
        raise ValueError(f"target_logits must have shape {list(shadow.logits.shape[1:])}, got {list(target_logits.shape)}")
    phi = shadow.scaled_confidence()
    observed = scaled_confidence(target_logits, shadow.labels)
    need = 1 if fixed_variance else 2
    n_in, n_out = shadow.keep.sum(0), (~shadow.keep).sum(0)
    if (n_out < need).any() or (online and (n_in < need).any()):
        raise ValueError(f"too few shadow models: every example needs at least {need} OUT"
                         f"{' and IN' if online else ''} models for "
                         f"{'fixed' if fixed_variance else 'per-example'} variance; got as few as "
                         f"{int(n_in.min())} IN and {int(n_out.min())} OUT")

    if fixed_variance == "global":  # the reference code's spread: all IN values online, OUT values offline
        pooled = phi[shadow.keep] if online else phi[~shadow.keep]
        global_std = max(float(pooled.double().std(correction=0)), 1e-6)

    def moments(mask):
        count = mask.sum(0).clamp_min(1)
        mean = (phi * mask).sum(0) / count
        var = (((phi - mean) ** 2) * mask).sum(0) / (count - 1).clamp_min(1)
        std = var.sqrt().clamp_min(1e-6)
        if fixed_variance == "global":
            std = torch.full_like(std, global_std)
        elif fixed_variance:
            std = torch.full_like(std, float(std.median()))
        return mean, std

    mean_out, std_out = moments(~shadow.keep)
    if not online:
        return torch.special.log_ndtr((observed - mean_out) / std_out)
    mean_in, std_in = moments(shadow.keep)
    return _normal_logpdf(observed, mean_in, std_in) - _normal_logpdf(observed, mean_out, std_out)


def rmia_scores(reference: ShadowSignals, target_logits: torch.Tensor, population: torch.Tensor,
                gamma: float = 1.0, offline_a: float | None = None, proportiontocut: float = 0.0) -> torch.Tensor:
    """RMIA (Zarifzadeh et al. 2024, Eq. 5-6): the fraction of population examples ``z`` that ``x``
    dominates in the pairwise likelihood ratio ``[p(x|target) / p(x)] / [p(z|target) / p(z)] > gamma``.

    ``p(.)`` is the true-class probability averaged over reference models. ``population`` holds the
    indices (into the N examples) of known non-members used as ``z``. Online, ``p(x)`` averages all
    reference models: a plain mean by default, or with ``proportiontocut > 0`` the trimmed mean that
    leaves out that share of the models at each end (``scipy.stats.trim_mean``; the authors' experiment
    configuration, ``research/2023_rmia`` in Privacy Meter, uses 0.2). Offline (``offline_a`` given)
    only the models where ``x`` was OUT, corrected by ``p(x) = ((1 + a) p_out(x) + (1 - a)) / 2`` as in
    the paper's offline variant (plain mean only).
    """
    if not isinstance(reference, ShadowSignals):
        raise TypeError(f"reference must be a ShadowSignals, got {type(reference).__name__}")
    check_tensor("target_logits", target_logits, kind="float", finite=True)
    if target_logits.shape != reference.logits.shape[1:]:
        raise ValueError(f"target_logits must have shape {list(reference.logits.shape[1:])}, "
                         f"got {list(target_logits.shape)}")
    gamma = check_positive_float("gamma", gamma)
    check_tensor("population", population, ndim=1, kind="int", nonempty=True)
    n_examples = reference.logits.shape[1]
    if int(population.min()) < 0 or int(population.max()) >= n_examples:
        raise ValueError(f"population must hold example indices in [0, {n_examples}), "
                         f"got values in [{int(population.min())}, {int(population.max())}]")
    if offline_a is not None:
        offline_a = check_float("offline_a", offline_a, 0, 1)
    proportiontocut = check_float("proportiontocut", proportiontocut, 0, 0.5, open_maximum=True)
    if offline_a is not None and proportiontocut > 0:
        raise ValueError(f"proportiontocut applies to online RMIA only (offline_a=None), got {proportiontocut}")
    probs = reference.true_class_probs()
    p_target = _at_label(torch.softmax(target_logits.float(), -1), reference.labels)
    if offline_a is None:
        cut = int(proportiontocut * len(probs))  # scipy.stats.trim_mean's count at each end
        p_marginal = probs.mean(0) if cut == 0 else probs.sort(0).values[cut:len(probs) - cut].mean(0)
    else:
        out = ~reference.keep
        if (out.sum(0) == 0).any():
            raise ValueError("offline RMIA needs at least one OUT reference model for every example")
        p_out = (probs * out).sum(0) / out.sum(0)
        p_marginal = 0.5 * ((1 + offline_a) * p_out + (1 - offline_a))
    ratio = p_target / p_marginal.clamp_min(1e-30)
    z_ratio = ratio[population]
    return (ratio[:, None] / z_ratio[None, :] > gamma).float().mean(1)


def shokri_attack(shadow: ShadowSignals, target_logits: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Shokri et al. (2017): train an attack classifier on the shadow models' outputs, labelled by
    whether the example was in that shadow model's training set, then apply it to the target's outputs.

    Features per (model, example): the sorted probability vector and the log-probability of the true
    class; one logistic-regression attack model for all classes. Returns P(member) per example.
    """
    from sklearn.linear_model import LogisticRegression

    if not isinstance(shadow, ShadowSignals):
        raise TypeError(f"shadow must be a ShadowSignals, got {type(shadow).__name__}")
    check_tensor("target_logits", target_logits, kind="float", finite=True)
    if target_logits.shape != shadow.logits.shape[1:]:
        raise ValueError(f"target_logits must have shape {list(shadow.logits.shape[1:])}, "
                         f"got {list(target_logits.shape)}")
    seed = check_int("seed", seed, minimum=0)

    def features(logits):
        probs = torch.softmax(logits.float(), -1)
        true = _at_label(probs, shadow.labels).unsqueeze(-1)
        return torch.cat([probs.sort(-1, descending=True).values, true.clamp_min(1e-30).log()], -1)

    train_x = features(shadow.logits).reshape(-1, shadow.logits.shape[-1] + 1).numpy()
    train_y = shadow.keep.reshape(-1).numpy()
    attack = LogisticRegression(max_iter=2000, random_state=seed).fit(train_x, train_y)
    return torch.tensor(attack.predict_proba(features(target_logits).numpy())[:, 1], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Evaluation: pooling many membership games
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pooled:
    """An attack's scores pooled over several targets, whether each scored example was a member of its
    target's training set, and (``examples``) which of the N examples each row scores (unpacks as
    ``scores, members = pooled[name]``). The games score the same examples over and over, so the rows
    are not independent: resample ``examples``, not rows, for an interval
    (:func:`companion.metrics.bootstrap_summary` with ``groups=examples``)."""

    scores: torch.Tensor
    members: torch.Tensor
    examples: torch.Tensor | None = None

    def __post_init__(self):
        check_tensor("scores", self.scores, ndim=1)
        check_tensor("members", self.members, ndim=1, kind="bool")
        if len(self.scores) != len(self.members):
            raise ValueError(f"scores and members must have the same length, got {len(self.scores)} and "
                             f"{len(self.members)}")
        if self.examples is not None:
            check_tensor("examples", self.examples, ndim=1, kind="int")
            if len(self.examples) != len(self.scores):
                raise ValueError(f"examples must have one entry per score ({len(self.scores)}), "
                                 f"got {len(self.examples)}")

    def __iter__(self):
        return iter((self.scores, self.members))


def _check_pooling(signals, attacks, targets, n_leave_one_out, n_population, seed, equal_in_out=False
                   ) -> tuple[list, int, int]:
    if not isinstance(signals, ShadowSignals):
        raise TypeError(f"signals must be a ShadowSignals, got {type(signals).__name__}")
    if not callable(attacks):
        raise TypeError(f"attacks must be a function (shadow, target_logits, population) -> dict of scores, "
                        f"got {type(attacks).__name__}")
    n_models, n_examples = signals.keep.shape
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"targets must be a list of (logits, members) pairs, got {type(targets).__name__}")
    for i, target in enumerate(targets):
        if not isinstance(target, (list, tuple)) or len(target) != 2:
            raise TypeError(f"targets[{i}] must be a (logits, members) pair, got {type(target).__name__}")
        check_tensor(f"targets[{i}] logits", target[0], kind="float", finite=True)
        check_tensor(f"targets[{i}] members", target[1], ndim=1, kind="bool")
        if target[0].shape != signals.logits.shape[1:] or len(target[1]) != n_examples:
            raise ValueError(f"targets[{i}] must be logits {list(signals.logits.shape[1:])} and members [{n_examples}], "
                             f"got {list(target[0].shape)} and {list(target[1].shape)}")
    n_leave_one_out = n_models if n_leave_one_out is None else \
        check_int("n_leave_one_out", n_leave_one_out, minimum=0, maximum=n_models)
    if n_leave_one_out + len(targets) == 0:
        raise ValueError("there is no game to pool: pass targets or n_leave_one_out >= 1")
    n_population = check_int("n_population", n_population, minimum=0)
    fewest_out = min([int((~signals.keep[t]).sum()) for t in range(n_leave_one_out)]
                     + [int((~members).sum()) for _, members in targets])
    if n_population >= fewest_out:
        raise ValueError(f"n_population must be smaller than every target's number of non-members "
                         f"(as few as {fewest_out}), got {n_population}")
    check_int("seed", seed, minimum=0)
    check_bool("equal_in_out", equal_in_out)
    if equal_in_out and n_leave_one_out:
        counts = signals.keep.sum(0)
        if n_models < 4 or n_models % 2 or (counts != n_models // 2).any():
            raise ValueError(f"equal_in_out needs an even number (>= 4) of shadow models with every example IN "
                             f"exactly half of them (mia.balanced_keep), got {n_models} models and IN counts "
                             f"from {int(counts.min())} to {int(counts.max())}")
    return list(targets), n_leave_one_out, n_population


def _equal_in_out_scores(signals: ShadowSignals, t: int, attacks, population) -> dict[str, torch.Tensor]:
    """Leave-one-out game ``t`` with as many IN as OUT shadow models for every example: each example
    is scored by the ``K - 2`` models left when the target ``t`` and one model on the example's
    majority side (an OUT model for the target's members, an IN model for its non-members) are
    removed; that model is the first such one in order, and the examples that share it are scored by
    one call of ``attacks``."""
    n_models, n_examples = signals.keep.shape
    others = [k for k in range(n_models) if k != t]
    left = torch.ones(n_examples, dtype=torch.bool)
    scores: dict[str, torch.Tensor] = {}
    for dropped in others:
        chosen = left & (signals.keep[dropped] != signals.keep[t])  # dropping it evens these examples
        if not chosen.any():
            continue
        rest = [k for k in others if k != dropped]
        part = attacks(ShadowSignals(signals.logits[rest], signals.keep[rest], signals.labels),
                       signals.logits[t], population)
        if not isinstance(part, dict) or not part:
            raise TypeError(f"attacks must return a non-empty dict of scores, got {type(part).__name__}")
        for name, values in part.items():
            check_tensor(f"attacks(...)[{name!r}]", values, ndim=1)
            if len(values) != n_examples:
                raise ValueError(f"attacks(...)[{name!r}] must score all {n_examples} examples, got {len(values)}")
            if name not in scores:
                scores[name] = torch.zeros(n_examples, dtype=values.dtype)
            scores[name][chosen] = values[chosen]
        left &= ~chosen
        if not left.any():
            return scores
    raise ValueError(f"equal_in_out: no shadow model evens examples {torch.nonzero(left).squeeze(1).tolist()[:5]} "
                     f"of game {t}")


def pooled_leave_one_out(signals: ShadowSignals, attacks, targets=(), n_leave_one_out: int | None = None,
                         n_population: int = 0, seed: int = 0, equal_in_out: bool = False) -> dict[str, Pooled]:
    """Score several membership games with ``attacks`` and pool each attack's scores, so that its TPR at
    a low FPR rests on many more non-members than one target has (Carlini et al. 2022 evaluate LiRA
    this way: each shadow model in turn is the target).

    The games are, in this order: each ``(logits, members)`` of ``targets`` against all K shadow
    models, then shadow model ``t = 0 .. n_leave_one_out - 1`` (default all K) against the other
    ``K - 1``. ``attacks(shadow, target_logits, population)`` returns ``{name: scores [N]}``. With
    ``n_population > 0``, each game draws that many of its target's non-members (a
    ``torch.randperm`` of them from ``torch.Generator().manual_seed(seed)``, game after game) as RMIA's
    population, and leaves them out of the pooled scores; with ``0``, ``population`` is ``None`` and
    every example is scored. Returns ``{name: Pooled(scores, members, examples)}`` concatenated game by
    game; ``examples`` is the index (in ``0 .. N - 1``) of the example each row scores.

    ``equal_in_out``: with :func:`balanced_keep` every example is IN in ``K/2`` models, so leaving the
    target out gives its members ``K/2 - 1`` IN and ``K/2`` OUT shadow models and its non-members the
    reverse: a one-model asymmetry that follows membership. ``True`` removes it from the leave-one-out
    games (``targets`` are independent of the shadow models and unchanged): each example is scored by
    ``K - 2`` models with ``K/2 - 1`` IN and ``K/2 - 1`` OUT (see :func:`_equal_in_out_scores`; about
    ``log2 N`` calls of ``attacks`` per game instead of one). The populations and the rows are those
    of ``equal_in_out=False``, so the two poolings can be compared row by row. Needs every example IN
    in exactly half of an even number ``K >= 4`` of models.
    """
    targets, n_leave_one_out, n_population = _check_pooling(signals, attacks, targets, n_leave_one_out,
                                                             n_population, seed, equal_in_out)
    generator = torch.Generator().manual_seed(seed)
    games = [(signals, logits, members, None) for logits, members in targets]
    for t in range(n_leave_one_out):
        others = torch.arange(len(signals.keep)) != t
        rest = ShadowSignals(signals.logits[others], signals.keep[others], signals.labels)
        games.append((rest, signals.logits[t], signals.keep[t], t))
    pooled = {}
    index = torch.arange(signals.keep.shape[1])  # the example each row scores
    for shadow, logits, members, left_out in games:
        evaluated = torch.ones(len(members), dtype=torch.bool)
        population = None
        if n_population:
            outs = torch.nonzero(~members).squeeze(1)
            population = outs[torch.randperm(len(outs), generator=generator)[:n_population]]
            evaluated[population] = False
        if equal_in_out and left_out is not None:
            scores = _equal_in_out_scores(signals, left_out, attacks, population)
        else:
            scores = attacks(shadow, logits, population)
        if not isinstance(scores, dict) or not scores:
            raise TypeError(f"attacks must return a non-empty dict of scores, got {type(scores).__name__}")
        for name, values in scores.items():
            check_tensor(f"attacks(...)[{name!r}]", values, ndim=1)
            if len(values) != len(members):
                raise ValueError(f"attacks(...)[{name!r}] must score all {len(members)} examples, got {len(values)}")
            pooled.setdefault(name, []).append((values[evaluated], members[evaluated], index[evaluated]))
    return {name: Pooled(*(torch.cat([part[i] for part in parts]) for i in range(3)))
            for name, parts in pooled.items()}


# tiny-llama's twin trained on the *reference* third of the people instead of the members (same
# documentation, same recipe, another seed): the reference model of this chapter's calibrated attacks.
zoo.register("tiny-llama-ref", zoo.LMRecipe(architecture="llama", hidden=128, layers=4, heads=4, intermediate=384,
                                            steps=280, seed=1, bio_split="reference"))
