"""Differentially private training: DP-SGD (Abadi et al. 2016), the defence against membership inference.

A training algorithm is (epsilon, delta)-differentially private when adding or removing any one example
changes the probability of any outcome (any set of trained weights) by at most a factor ``e^epsilon``,
plus ``delta`` (Dwork & Roth 2014, Def. 2.4). A membership attack is a test of exactly that change, so
its ROC curve is bounded: ``TPR <= e^epsilon * FPR + delta`` (Kairouz et al. 2015; the bound that DP
auditing checks). DP-SGD (Abadi et al. 2016, Algorithm 1) makes one optimiser step private by

1. **sampling** each training example independently with probability ``q`` (Poisson sampling);
2. **clipping** each example's gradient to norm ``C``: ``g_i * min(1, C / ||g_i||)``;
3. **adding noise** to the sum: ``sum_i clip(g_i) + N(0, sigma^2 C^2 I)``, divided by the expected
   batch size ``q n`` (Opacus's ``expected_batch_size = int(q n)``), not by the random number of
   examples the Poisson draw picked: that count depends on who is in the data, and dividing by it
   would leak it.

The optimiser then only ever sees the noisy gradient, so anything it does with it (momentum, Adam)
is post-processing and keeps the guarantee. We use Adam, as the course's non-private recipes do: on
the digits it reached 91.5% test accuracy at epsilon = 4 where SGD with momentum reached 87-88%.
That choice was made on the test half of the digits, which chapter 01 also evaluates on: chapter 01
says so, and judges utility on fresh shadow trainings rather than on that one model.

**Accounting.** Each step is a sampled Gaussian mechanism; composing ``T`` of them gives the epsilon
of the whole run for a chosen delta. We use Opacus's RDP accountant (Renyi DP, Mironov 2017; the
sampled-Gaussian analysis of Mironov, Talwar & Zhang 2019), the successor of Abadi et al.'s moments
accountant: it has a closed form, no numerical tolerance, and is the default of Opacus's
``get_noise_multiplier``. Opacus's PRV accountant (Gopi et al. 2021) is tighter (about 10% smaller
epsilon for our settings); ``accountant="prv"`` selects it.

Two implementations of the same algorithm:

- :func:`train_dp_classifier` trains one model with Opacus's ``PrivacyEngine`` (the tool a reader uses
  on their own model);
- :func:`train_private_shadow_models` trains K models at once with ``torch.func.vmap``, like
  :func:`companion.mia.train_shadow_models`, so that LiRA can attack DP-trained models;
  :func:`privacy_utility_experiment` (chapter 01's experiment) runs one point of the privacy-utility
  curve end to end.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from companion import mia
from companion.checks import (check_choice, check_classifier_data, check_float, check_int, check_positive_float,
                              check_tensor)
from companion.train import GradientTransform, train_stacked_models

ACCOUNTANTS = ("rdp", "prv")


def _check_float(name: str, value, minimum: float = 0.0, allow_inf: bool = False) -> float:
    return check_float(name, value, minimum, allow_inf=allow_inf)


def _check_delta(delta) -> float:
    return check_float("delta", delta, 0, 1, open_minimum=True, open_maximum=True)


def _check_sample_rate(sample_rate) -> float:
    """Poisson sampling probability ``q`` in ``(0, 1]`` (Opacus's accountant fails on anything else)."""
    return check_float("sample_rate", sample_rate, 0, 1, open_minimum=True)


def _check_accountant(accountant) -> str:
    return check_choice("accountant", accountant, ACCOUNTANTS)


# ---------------------------------------------------------------------------------------------
# The two knobs of DP-SGD, and what they cost in privacy
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD's recipe (Abadi et al. 2016, Algorithm 1): the noise multiplier ``sigma`` and clipping
    norm ``C`` of each step, the optimiser (Adam at ``lr``) on Poisson batches of expected size
    ``batch_size`` for ``epochs``, and how the privacy spent is accounted (``delta``, ``accountant``).

    Every DP-SGD trainer of this module takes one of these. ``DPConfig(0.0, math.inf)`` is ordinary
    (non-private) training with the same Poisson batches; :meth:`calibrated` picks ``sigma`` for a
    target epsilon.
    """

    noise_multiplier: float
    max_grad_norm: float
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-2
    delta: float = 1e-5
    accountant: str = "rdp"

    def __post_init__(self):
        _check_float("noise_multiplier", self.noise_multiplier)
        _check_float("max_grad_norm", self.max_grad_norm, allow_inf=True)
        if self.max_grad_norm == 0:
            raise ValueError("max_grad_norm must be > 0, got 0")
        if math.isinf(self.max_grad_norm) and self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be 0 when max_grad_norm is inf (the noise is "
                             f"sigma * C), got {self.noise_multiplier}")
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_positive_float("lr", self.lr)
        _check_delta(self.delta)
        _check_accountant(self.accountant)

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0

    def schedule(self, n_examples: int) -> tuple[float, int]:
        """The sampling rate ``q`` and the step count of this recipe on ``n_examples`` (:func:`poisson_schedule`)."""
        return poisson_schedule(n_examples, self.batch_size, self.epochs)

    def calibrated(self, target_epsilon: float, n_examples: int) -> "DPConfig":
        """This recipe with the smallest noise multiplier that spends at most ``target_epsilon`` (at
        this ``delta``) when trained on ``n_examples`` (:func:`noise_multiplier_for`); needs a finite
        clipping norm."""
        target_epsilon = check_positive_float("target_epsilon", target_epsilon)
        if math.isinf(self.max_grad_norm):
            raise ValueError("calibrated needs a finite max_grad_norm (the noise is sigma * C), got inf")
        sample_rate, steps = self.schedule(n_examples)
        sigma = noise_multiplier_for(target_epsilon, self.delta, sample_rate, steps, self.accountant)
        return dataclasses.replace(self, noise_multiplier=sigma)


@dataclass(frozen=True)
class PrivacyReport:
    """What a DP-SGD run spent: ``(epsilon, delta)`` from ``accountant`` after ``steps`` steps at
    sampling rate ``sample_rate`` with ``noise_multiplier`` and ``max_grad_norm``."""

    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    accountant: str


def poisson_schedule(n_examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """The sampling rate ``q`` and the step count, by Opacus's convention: ``q = 1 / ceil(n / B)``
    (one "epoch" is ``1/q`` steps, each with ``q n ~= B`` examples on average)."""
    n_examples = check_int("n_examples", n_examples, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    epochs = check_int("epochs", epochs, minimum=1)
    steps_per_epoch = math.ceil(n_examples / batch_size)
    return 1.0 / steps_per_epoch, epochs * steps_per_epoch


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = "rdp") -> float:
    """Epsilon of ``steps`` compositions of the sampled Gaussian mechanism (Opacus's accountant);
    ``inf`` without noise."""
    noise_multiplier = _check_float("noise_multiplier", noise_multiplier)
    sample_rate = _check_sample_rate(sample_rate)
    steps = check_int("steps", steps, minimum=1)
    delta, accountant = _check_delta(delta), _check_accountant(accountant)
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants import create_accountant

    counter = create_accountant(mechanism=accountant)
    counter.history = [(noise_multiplier, sample_rate, steps)]
    return float(counter.get_epsilon(delta=delta))


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = "rdp") -> float:
    """The smallest ``sigma`` (to Opacus's tolerance, 0.01 in epsilon) whose run spends at most
    ``target_epsilon``: a binary search over the accountant (Opacus's ``get_noise_multiplier``)."""
    target_epsilon = check_positive_float("target_epsilon", target_epsilon)
    sample_rate = _check_sample_rate(sample_rate)
    steps = check_int("steps", steps, minimum=1)
    delta, accountant = _check_delta(delta), _check_accountant(accountant)
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # the search tries tiny sigmas whose best Renyi order is off the grid
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))


def _report(config: DPConfig, sample_rate: float, steps: int) -> PrivacyReport:
    epsilon = epsilon_spent(config.noise_multiplier, sample_rate, steps, config.delta, config.accountant)
    return PrivacyReport(epsilon, config.delta, config.noise_multiplier, config.max_grad_norm, sample_rate, steps,
                         config.accountant)


# ---------------------------------------------------------------------------------------------
# One model with Opacus
# ---------------------------------------------------------------------------------------------


def _check_config(config) -> DPConfig:
    if not isinstance(config, DPConfig):
        raise TypeError(f"config must be a DPConfig, got {type(config).__name__}")
    return config


def train_dp_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: DPConfig, seed: int = 0
                        ) -> tuple[nn.Module, PrivacyReport]:
    """Train ``model`` (in place) with DP-SGD through Opacus's ``PrivacyEngine``: Poisson sampling,
    per-example clipping to ``config.max_grad_norm``, Gaussian noise ``noise_multiplier * max_grad_norm``,
    Adam. The loader shuffles with ``seed``, the noise is drawn from ``seed + 1``.

    Returns the trained model (in eval mode, the original module, not Opacus's wrapper) and the
    :class:`PrivacyReport` of Opacus's accountant. ``DPConfig(0.0, math.inf)`` is plain Adam on
    Poisson batches (epsilon = inf).
    """
    check_classifier_data(model, x, y)
    config = _check_config(config)
    seed = check_int("seed", seed, minimum=0)
    from opacus import PrivacyEngine

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=config.batch_size,
                                         generator=torch.Generator().manual_seed(seed))
    sample_rate, steps = config.schedule(len(x))
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off (fine for teaching: it only hardens the random numbers)
        # and torch that its backward hooks fire although the inputs need no gradient (they need none).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        engine = PrivacyEngine(accountant=config.accountant)
        private_model, optimizer, private_loader = engine.make_private(
            module=model, optimizer=torch.optim.Adam(model.parameters(), lr=config.lr), data_loader=loader,
            noise_multiplier=config.noise_multiplier, poisson_sampling=True,
            max_grad_norm=min(config.max_grad_norm, 1e30),  # Opacus computes sigma * C: inf would give nan
            noise_generator=torch.Generator().manual_seed(seed + 1))
        private_model.train()
        for _ in range(config.epochs):
            for xb, yb in private_loader:
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(private_model(xb), yb).backward()
                optimizer.step()
    private_model.remove_hooks()
    for p in model.parameters():  # drop the per-example buffers Opacus left on the parameters
        p.grad = None
        for leftover in ("grad_sample", "summed_grad"):
            if hasattr(p, leftover):
                delattr(p, leftover)
    model.eval()
    # Opacus's accountant recorded every step: (sigma, q, steps) in one entry, as poisson_schedule said
    if engine.accountant.history != [(config.noise_multiplier, sample_rate, steps)]:
        raise RuntimeError(f"Opacus accounted {engine.accountant.history}, expected "
                           f"{[(config.noise_multiplier, sample_rate, steps)]}")
    epsilon = engine.get_epsilon(config.delta) if config.private else math.inf
    return model, PrivacyReport(float(epsilon), config.delta, config.noise_multiplier, config.max_grad_norm,
                                sample_rate, steps, config.accountant)


# ---------------------------------------------------------------------------------------------
# K models at once: DP-SGD with torch.func
# ---------------------------------------------------------------------------------------------


def clip_and_sum(grads: dict[str, torch.Tensor], weights: torch.Tensor, max_grad_norm: float
                 ) -> dict[str, torch.Tensor]:
    """Steps 2 and the sum of step 3: ``sum_i w_i * g_i * min(1, C / (||g_i|| + 1e-6))``.

    ``grads`` maps each parameter to per-example gradients ``[..., B, *shape]``; ``||g_i||`` is the
    norm over *all* parameters of example ``i`` (Opacus's "flat" clipping, same ``1e-6``);
    ``weights`` ``[..., B]`` is 1 for a sampled example and 0 for padding.
    """
    lead = weights.ndim
    norms = torch.stack([g.flatten(lead).norm(dim=-1) for g in grads.values()], -1).norm(dim=-1)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * weights
    return {name: (factor.unsqueeze(-2) @ g.flatten(lead)).squeeze(-2).view(*g.shape[:lead - 1], *g.shape[lead:])
            for name, g in grads.items()}


def _poisson_batches(keep: torch.Tensor, sample_rate: float, steps: int, seed: int):
    """Per step, each model's Poisson batch padded to a common width: ``(index [K, B], weight [K, B])``.
    Model ``k`` samples each of *its own* examples (``keep[k]``) with probability ``q``."""
    generator = torch.Generator().manual_seed(seed)
    schedule = []
    for _ in range(steps):
        chosen = keep & (torch.rand(keep.shape, generator=generator) < sample_rate)
        width = max(1, int(chosen.sum(1).max()))
        index = (~chosen).to(torch.uint8).argsort(dim=1, stable=True)[:, :width]  # chosen examples first
        schedule.append((index, chosen.gather(1, index).float()))
    return schedule


class PrivateGradient(GradientTransform):
    """One model's DP-SGD gradient (Abadi et al. 2016, Algorithm 1), as the per-example gradient hook of
    :func:`companion.train.train_stacked_models`: clip each example's gradient to ``C``, sum, add the
    noise ``N(0, sigma^2 C^2 I)``, divide by the model's expected batch size ``q n_k``.

    Model ``k``'s noise comes from its own ``torch.Generator().manual_seed(seed + k)``, drawn every step
    with ``torch.normal(0, sigma C, shape)`` parameter by parameter, as Opacus draws it. Without
    clipping (``C = inf``, hence no noise) the clipped sum is the gradient of the summed loss, so no
    per-example gradients are computed (``per_example = False``).
    """

    def __init__(self, config: DPConfig, shapes: dict[str, torch.Size], expected_batch: torch.Tensor, seed: int):
        self.max_grad_norm = _check_config(config).max_grad_norm
        if not isinstance(shapes, dict) or not shapes:
            raise TypeError(f"shapes must be a non-empty dict of parameter name -> shape, got {type(shapes).__name__}")
        check_tensor("expected_batch", expected_batch, ndim=1, kind="float", finite=True, nonempty=True)
        if bool((expected_batch <= 0).any()):
            raise ValueError(f"expected_batch must be > 0 for every model, got a minimum of {float(expected_batch.min())}")
        seed = check_int("seed", seed, minimum=0)
        self.per_example = not math.isinf(self.max_grad_norm)
        self.noise_std = config.noise_multiplier * config.max_grad_norm if config.private else 0.0
        self.shapes, self.expected_batch = shapes, expected_batch
        self.generators = [torch.Generator().manual_seed(seed + k) for k in range(len(expected_batch))]

    def draw(self, model: int) -> dict:
        noise = {name: torch.normal(0.0, self.noise_std, shape, generator=self.generators[model])
                 if self.noise_std > 0 else torch.zeros(shape) for name, shape in self.shapes.items()}
        return {"noise": noise, "denominator": self.expected_batch[model]}

    def __call__(self, grads: dict, weight: torch.Tensor, drawn: dict) -> dict:
        total = clip_and_sum(grads, weight, self.max_grad_norm) if self.per_example else grads
        return {name: (total[name] + drawn["noise"][name]) / drawn["denominator"] for name in total}


def train_private_shadow_models(make_model, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, config: DPConfig,
                                seed: int = 0, vectorized: bool = True) -> tuple[mia.ShadowSignals, PrivacyReport]:
    """DP-SGD for K models of ``make_model()``'s architecture, model ``k`` on the examples with
    ``keep[k]``: the same algorithm as :func:`train_dp_classifier`, trained by
    :func:`companion.train.train_stacked_models` with :class:`PrivateGradient` as its per-example
    gradient hook (``vmap`` over models and, for per-example gradients, over examples).

    Every model uses the sampling rate and step count of a training set of the *mean* shadow size
    (:func:`poisson_schedule`), so all K models, and an Opacus model trained on a set of that size, spend
    the same epsilon. Each model normalises by its own expected batch size ``floor(q n_k)`` as Opacus
    does. Randomness, so that a reference can replay it: initial weights from ``torch.manual_seed(seed)``
    (``make_model()`` K times), the batches from ``torch.Generator().manual_seed(seed + 1)`` (per step,
    ``rand(K, N) < q``), model ``k``'s noise from ``torch.Generator().manual_seed(seed + 2 + k)``. So
    ``vectorized=False`` (one model at a time, the reference) gives the same models.
    Returns ``(ShadowSignals, PrivacyReport)``.
    """
    config = _check_config(config)
    mia.check_shadow_setup(make_model, x, keep, config.batch_size, config.epochs, config.lr, seed, vectorized)
    sample_rate, steps = config.schedule(round(keep.sum(1).float().mean().item()))
    expected_batch = (keep.sum(1).double() * sample_rate).floor().clamp_min(1).float()  # [K], Opacus's int(n q)
    schedule = _poisson_batches(keep, sample_rate, steps, seed + 1)
    shapes = {name: p.shape for name, p in make_model().named_parameters()}  # (the trainer re-seeds)
    gradient = PrivateGradient(config, shapes, expected_batch, seed + 2)
    logits = train_stacked_models(make_model, len(keep), x, y, schedule, config.lr, seed=seed,
                                  vectorized=vectorized, transform=gradient)
    signals = mia.ShadowSignals(logits=logits, keep=keep.clone(), labels=y.clone())
    return signals, _report(config, sample_rate, steps)


# ---------------------------------------------------------------------------------------------
# Chapter 01's experiment: the privacy-utility curve, what each epsilon buys against LiRA and costs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One point of the curve: a named DP-SGD recipe, its noise multiplier calibrated to
    ``target_epsilon`` on the target's training set (``None``: the recipe as given, e.g. non-private)."""

    name: str
    config: DPConfig
    target_epsilon: float | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name must be a non-empty str, got {self.name!r}")
        _check_config(self.config)
        if self.target_epsilon is not None:
            check_positive_float("target_epsilon", self.target_epsilon)
            if math.isinf(self.config.max_grad_norm):
                raise ValueError("a Setting with a target_epsilon needs a config with a finite max_grad_norm, got inf")

    def resolve(self, n_examples: int) -> DPConfig:
        """The recipe to train with on ``n_examples``: ``config``, calibrated when there is a target epsilon."""
        return self.config if self.target_epsilon is None else self.config.calibrated(self.target_epsilon, n_examples)


_NON_PRIVATE, _DP_SGD = DPConfig(0.0, math.inf), DPConfig(0.0, 1.0)

#: The chapter's curve: the non-private recipe; the same recipe truncated to 1 epoch (chosen on the
#: target's training half only by ``benchmarks/early_stop_selection.py``: 5-fold cross-validation, the
#: epoch count whose held-out accuracy is closest to DP-SGD's at epsilon 4) and stopped at the epoch
#: count with the best cross-validated accuracy (early stopping as practised; regularisers with no
#: guarantee); and DP-SGD (clipping at 1) at three budgets. Chapter 01 judges utility on
#: ``shadow_accuracy["test half"]`` and its spread over the shadow models.
SETTINGS = (
    Setting("non-private", _NON_PRIVATE),
    Setting("early-stopped", dataclasses.replace(_NON_PRIVATE, epochs=1)),
    # 12 = the record's best_epochs (chapter 01 asserts it)
    Setting("early-stopped (CV best)", dataclasses.replace(_NON_PRIVATE, epochs=12)),
    Setting("dp eps=16", _DP_SGD, target_epsilon=16.0),
    Setting("dp eps=4", _DP_SGD, target_epsilon=4.0),
    Setting("dp eps=1", _DP_SGD, target_epsilon=1.0),
)


@dataclass
class PrivacyUtilityPoint:
    """One point of the curve. ``test_accuracy`` is the Opacus-trained target's, on the digits' test
    half; the LiRA figures pool ``n_shadow`` leave-one-out games (each shadow model in turn is the
    target, scored against the other ``n_shadow - 1``), so they rest on ``n_negatives`` non-members.
    ``summaries`` holds each LiRA variant's :func:`companion.metrics.summary` (counts and intervals),
    ``lira`` the same numbers flat; ``members`` and ``scores`` (per variant) the pooled games, for ROC curves,
    and ``examples`` the digit each pooled row scores: the games share their digits, so an interval
    resamples digits (:func:`companion.metrics.bootstrap_summary` with ``groups=examples``), not rows.
    ``shadow_accuracy`` holds each shadow model's accuracy on its OUT digits (not in its training set),
    ``[n_shadow]`` arrays for the digits of ``"member half"`` (the target's training half) and
    ``"test half"``: the utility of the recipe over ``n_shadow`` trainings, not one model's."""

    setting: Setting
    report: PrivacyReport
    test_accuracy: float
    train_accuracy: float
    lira: dict[str, dict[str, float]]
    target_lira_auc: float
    n_negatives: int
    seconds: float
    members: np.ndarray | None = None
    scores: dict[str, np.ndarray] | None = None
    summaries: dict | None = None
    examples: np.ndarray | None = None
    shadow_accuracy: dict[str, np.ndarray] | None = None

    def row(self) -> dict[str, float | str]:
        """A flat summary, e.g. for ``pandas.DataFrame([p.row() for p in points])``."""
        return {"setting": self.setting.name, "epsilon": self.report.epsilon, "delta": self.report.delta,
                "noise_multiplier": self.report.noise_multiplier, "test_accuracy": self.test_accuracy,
                **{f"{variant} {metric}": value for variant, metrics in self.lira.items()
                   for metric, value in metrics.items()},
                "seconds": self.seconds}


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


#: The LiRA variants of the curve: online with per-example variances, and with one fixed variance.
LIRA_VARIANTS = {"online": dict(online=True), "fixed variance": dict(online=True, fixed_variance=True)}


def privacy_utility_experiment(setting: Setting, n_shadow: int = 32, seed: int = 0, make_model=None
                               ) -> PrivacyUtilityPoint:
    """Chapter 01's experiment, one point of the privacy-utility curve: train a target with Opacus
    (:func:`train_dp_classifier`) on the member half of ``data.digits_splits(seed=0)`` and ``n_shadow``
    models with the same recipe (:func:`train_private_shadow_models`, each on a random half of all
    1,797 digits), then attack with LiRA (Carlini et al. 2022) in each :data:`LIRA_VARIANTS`, pooled
    over every shadow model as the target (:func:`companion.mia.pooled_leave_one_out`).

    ``make_model`` defaults to the ``digits-mlp`` architecture (64-256-10). The settings' ``delta = 1e-5``
    is well below ``1/n`` (n = 898 training digits): a delta near ``1/n`` would allow publishing one
    random training example outright.
    """
    from companion import data, metrics, zoo

    if not isinstance(setting, Setting):
        raise TypeError(f"setting must be a Setting, got {type(setting).__name__}")
    n_shadow = check_int("n_shadow", n_shadow, minimum=6)  # leave-one-out: >= 2 IN and 2 OUT per example
    seed = check_int("seed", seed, minimum=0)
    if make_model is not None and (isinstance(make_model, nn.Module) or not callable(make_model)):
        raise TypeError(f"make_model must be None or a function returning a fresh nn.Module, "
                        f"got {type(make_model).__name__}")
    if make_model is None:
        def make_model():
            return zoo.build_classifier(zoo.recipe_of("digits-mlp"))

    started = time.perf_counter()
    splits = data.digits_splits(seed=0)
    config = setting.resolve(len(splits.x_train))

    # The target, with Opacus
    torch.manual_seed(seed)
    target, report = train_dp_classifier(make_model(), splits.x_train, splits.y_train, config, seed=seed)

    # The shadow models, vectorised, on random halves of all the digits
    x = torch.cat([splits.x_train, splits.x_test])
    y = torch.cat([splits.y_train, splits.y_test])
    keep = mia.balanced_keep(n_shadow, len(x), seed=seed)
    shadow, shadow_report = train_private_shadow_models(make_model, x, y, keep, config, seed=seed)
    if (shadow_report.sample_rate, shadow_report.steps) != (report.sample_rate, report.steps):
        raise RuntimeError(f"shadow models and target were accounted differently: {shadow_report} vs {report}")

    # LiRA: each shadow model in turn is the target; the others are its shadow models
    def lira(rest, logits, population):
        return {name: mia.lira_scores(rest, logits, **options) for name, options in LIRA_VARIANTS.items()}

    pooled = mia.pooled_leave_one_out(shadow, lira)
    members = pooled["online"].members.numpy()
    scores = {name: p.scores.numpy() for name, p in pooled.items()}
    summaries = {name: metrics.summary(members, s, fprs=(0.01, 0.001)) for name, s in scores.items()}
    lira_table = {name: {"auc": s.auc, "tpr@1%": s.at(0.01).tpr.rate, "tpr@0.1%": s.at(0.001).tpr.rate}
                  for name, s in summaries.items()}
    with torch.no_grad():
        target_scores = mia.lira_scores(shadow, target(x))
    target_members = (torch.arange(len(x)) < len(splits.x_train)).numpy()
    correct = shadow.logits.argmax(-1) == y  # [K, N]
    shadow_accuracy = {}
    for half, in_half in (("member half", torch.from_numpy(target_members)),
                          ("test half", torch.from_numpy(~target_members))):
        out = ~shadow.keep & in_half
        shadow_accuracy[half] = ((correct & out).sum(1) / out.sum(1)).double().numpy()
    return PrivacyUtilityPoint(
        setting=setting, report=report, test_accuracy=_accuracy(target, splits.x_test, splits.y_test),
        train_accuracy=_accuracy(target, splits.x_train, splits.y_train), lira=lira_table,
        target_lira_auc=metrics.auc(target_members, target_scores.numpy()), n_negatives=int((~members).sum()),
        seconds=time.perf_counter() - started, members=members, scores=scores, summaries=summaries,
        examples=pooled["online"].examples.numpy(), shadow_accuracy=shadow_accuracy)
