"""Chapter 04: model inversion — what a model's outputs give away about its training data (and itself).

The attacker of this chapter sees an API. It reads, for an input of its choice, what the service
releases: a probability vector (or a truncated, rounded or noisy one, or only a label). The lesson
reads top to bottom:

1. **The API and its output defences** (:class:`ProbabilityAPI` and the wrappers :class:`TopK`,
   :class:`Rounded`, :class:`LabelOnly`, :class:`Noisy`, :class:`Temperature`): the post-processors
   that ART ships (``ClassLabels``, ``HighConfidence``, ``Rounded``, ``GaussianNoise``), as
   ``nn.Module`` s around any classifier.
2. **White-box gradient inversion** (:func:`mi_face`; Fredrikson et al. 2015, Alg. 1): descend on
   the cost ``1 - p_y(x)`` (plus an image prior) over the input.
3. **Black-box inversion** (:func:`nes_inversion`): the same ascent with a gradient estimated from
   queries only (antithetic NES, Wierstra et al. 2014; Ilyas et al. 2018).
4. **Training-based inversion** (:class:`InversionNet`, :func:`train_inverter`; Yang et al. 2019):
   a network trained on auxiliary data maps released vectors back to images.
5. **Judging a reconstruction** (:func:`recognised`, :func:`nearest_distance`): an independent
   evaluation classifier (never the target; :data:`EVALUATOR`, registered below) and the distance to
   the nearest private example of the class.
6. **What logits reveal about the model** (:func:`last_logits`, :func:`hidden_size_estimate`,
   :class:`LogprobAPI`, :func:`recover_logits`; Carlini et al. 2024, Finlayson et al. 2024): full
   logit vectors of a transformer lie in a subspace of its hidden size.
7. **The Secret Sharer, taken to extraction** (:func:`plant_canaries`, :class:`VaultRecipe`,
   :func:`secret_log_probs`, :func:`exposure`, :func:`exposure_extrapolated`,
   :func:`extract_secret`; Carlini et al. 2019).

Every function validates its arguments; the LM functions take any Hugging Face causal LM and its
tokenizer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from companion import data, zoo
from companion.checks import (check_bool, check_choice, check_float, check_int, check_lm_and_tokenizer,
                              check_labels, check_module, check_positive_float, check_str, check_tensor,
                              check_texts, check_tokenizer)
from companion.runtime import seed_everything
from companion.train import shuffled_epochs

#: The digits are 8 x 8 grey images with pixels in [0, 1], flattened to 64 features.
IMAGE_SHAPE = (8, 8)
N_PIXELS = 64
#: The target model of the image attacks (``companion.zoo``'s digits MLP) and the independent judge.
TARGET = "digits-mlp"
EVALUATOR = "digits-eval-cnn"


# ---------------------------------------------------------------------------------------------
# 0. Who holds which digits
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitRoles:
    """The digits split by role: ``private`` is what the target trained on (``digits_splits(0).train``);
    ``aux`` is the attacker's background data (same distribution; a random split, so no image is
    shared but writers may be); ``holdout`` is
    the defender's own clean data for measuring an output defence's utility (never seen by either)."""

    x_private: torch.Tensor
    y_private: torch.Tensor
    x_aux: torch.Tensor
    y_aux: torch.Tensor
    x_holdout: torch.Tensor
    y_holdout: torch.Tensor


def digit_roles(aux_size: int = 600) -> DigitRoles:
    """Split the target's non-members (``digits_splits(0).test``, 898 digits) into the attacker's
    auxiliary set (the first ``aux_size``) and the defender's holdout (the rest)."""
    aux_size = check_int("aux_size", aux_size, minimum=10, maximum=888)
    splits = data.digits_splits(seed=0)
    return DigitRoles(splits.x_train, splits.y_train, splits.x_test[:aux_size], splits.y_test[:aux_size],
                      splits.x_test[aux_size:], splits.y_test[aux_size:])


# ---------------------------------------------------------------------------------------------
# 1. The API and its output defences
# ---------------------------------------------------------------------------------------------


def _n_outputs(model: nn.Module) -> int | None:
    """The width of the last ``nn.Linear`` of a classifier (its number of classes), if it has one."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


class ProbabilityAPI(nn.Module):
    """A classifier behind an API that releases its full probability vector ``softmax(f(x))``.

    ``forward(x)`` returns what the service releases for a batch ``[N, 64]`` and counts ``N`` queries
    (:attr:`queries`); subclasses change only :meth:`release`. Gradients flow through ``forward``
    wherever the post-processing is differentiable, so the same object also shows what a white-box
    attacker would get from autograd through the released vector (zero through rounding and labels).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        check_module("model", model)
        self.model = model
        self.n_classes = _n_outputs(model)
        self.queries = 0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def release(self, probs: torch.Tensor) -> torch.Tensor:
        """What the service shows for probabilities ``probs`` ``[N, C]`` (the full vector here)."""
        return probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=2, kind="float", finite=True, nonempty=True)
        self.queries += len(x)
        return self.release(torch.softmax(self.logits(x), dim=-1))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The label the service returns with every answer: the model's own argmax (one query each)."""
        with torch.no_grad():
            return self(x).argmax(dim=-1)


class Temperature(ProbabilityAPI):
    """Releases ``softmax(f(x) / t)``: ``t > 1`` flattens the vector, the argmax is unchanged."""

    def __init__(self, model: nn.Module, t: float = 5.0):
        super().__init__(model)
        self.t = check_positive_float("t", t)

    def logits(self, x):
        return self.model(x) / self.t


class TopK(ProbabilityAPI):
    """Releases only the ``k`` largest probabilities, the rest set to 0 (ART's ``HighConfidence`` and
    the truncation of Yang et al. 2019; ``k = 1`` is a label with its confidence)."""

    def __init__(self, model: nn.Module, k: int = 1):
        super().__init__(model)
        self.k = check_int("k", k, minimum=1, maximum=self.n_classes)

    def release(self, probs):
        if self.k > probs.shape[1]:
            raise ValueError(f"k must be <= the number of classes ({probs.shape[1]}), got {self.k}")
        top = probs.topk(self.k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, top.indices, top.values)


class Rounded(ProbabilityAPI):
    """Releases the probabilities rounded to ``decimals`` decimal places (ART's ``Rounded``; the defence
    Fredrikson et al. 2015 proposed). Rounding has zero gradient almost everywhere."""

    def __init__(self, model: nn.Module, decimals: int = 2):
        super().__init__(model)
        self.decimals = check_int("decimals", decimals, minimum=0)

    def release(self, probs):
        scale = 10.0 ** self.decimals
        return torch.round(probs * scale) / scale


class LabelOnly(ProbabilityAPI):
    """Releases only the predicted label, as a one-hot vector (ART's ``ClassLabels``)."""

    def release(self, probs):
        return nn.functional.one_hot(probs.argmax(dim=-1), probs.shape[1]).to(probs.dtype)


class Noisy(ProbabilityAPI):
    """Adds fresh Gaussian noise of standard deviation ``std`` to the logits of every query, then
    releases the softmax (a noise defence; unlike ART's ``GaussianNoise`` the vector stays a
    distribution). The noise is seeded, so a notebook's run is reproducible; each query draws anew."""

    def __init__(self, model: nn.Module, std: float = 1.0, seed: int = 0):
        super().__init__(model)
        self.std = check_float("std", std, 0)
        self.generator = torch.Generator().manual_seed(check_int("seed", seed, minimum=0))

    def logits(self, x):
        logits = self.model(x)
        noise = torch.randn(logits.shape, generator=self.generator, dtype=logits.dtype)
        return logits + self.std * noise


def api_utility(api: ProbabilityAPI, x: torch.Tensor, y: torch.Tensor) -> dict:
    """What an output defence costs an honest user on clean inputs ``x`` with labels ``y``:
    ``correct`` (how many released vectors have their largest entry, first on ties, at the true
    label) and the Brier score ``mean ||released - onehot(y)||^2`` (0 is perfect; it charges for
    confidence information the defence removed)."""
    if not isinstance(api, ProbabilityAPI):
        raise TypeError(f"api must be a ProbabilityAPI (or one of its wrappers), got {type(api).__name__}")
    check_tensor("x", x, ndim=2, kind="float", finite=True, nonempty=True)
    check_labels("y", y, api.n_classes)
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    with torch.no_grad():
        released = api(x)
    onehot = nn.functional.one_hot(y, released.shape[1]).to(released.dtype)
    return {"correct": int((released.argmax(-1) == y).sum()), "n": len(y),
            "brier": float(((released - onehot) ** 2).sum(-1).mean())}


# ---------------------------------------------------------------------------------------------
# 2. Judging a reconstruction
# ---------------------------------------------------------------------------------------------


def _check_images(images, name: str = "images") -> torch.Tensor:
    check_tensor(name, images, ndim=2, kind="float", finite=True, nonempty=True)
    if images.shape[1] != N_PIXELS:
        raise ValueError(f"{name} must be [N, {N_PIXELS}] flattened 8x8 digits, got shape {tuple(images.shape)}")
    return images


def _check_classes(classes, n: int, n_classes: int = 10) -> torch.Tensor:
    """A class index per image: an int (broadcast) or a 1-D int64 tensor of length ``n``."""
    if isinstance(classes, bool) or not isinstance(classes, (int, torch.Tensor)):
        raise TypeError(f"target_class must be an int or a 1-D tensor of class indices, got {type(classes).__name__}")
    if isinstance(classes, int):
        check_int("target_class", classes, minimum=0, maximum=n_classes - 1)
        return torch.full((n,), classes, dtype=torch.long)
    check_labels("target_class", classes, n_classes)
    if len(classes) != n:
        raise ValueError(f"target_class must have one class per image ({n}), got {len(classes)}")
    return classes


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of each 8x8 image, ``sum |x[i+1,j]-x[i,j]| + |x[i,j+1]-x[i,j]|``
    (Rudin et al. 1992): small for smooth strokes, large for pixel noise. Shape ``[N]``."""
    _check_images(images)
    grid = images.view(-1, *IMAGE_SHAPE)
    return (grid[:, 1:] - grid[:, :-1]).abs().sum((1, 2)) + (grid[:, :, 1:] - grid[:, :, :-1]).abs().sum((1, 2))


def recognised(evaluator: nn.Module, images: torch.Tensor, target_class) -> torch.Tensor:
    """Whether the independent ``evaluator`` labels each image as its target class (attack accuracy,
    the MI literature's main metric: never judge with the target itself, whose decision the attack
    optimised). A bool tensor ``[N]``; sum it for k of n."""
    check_module("evaluator", evaluator)
    _check_images(images)
    classes = _check_classes(target_class, len(images))
    with torch.no_grad():
        return evaluator(images).argmax(-1) == classes


def nearest_distance(images: torch.Tensor, target_class, x_ref: torch.Tensor, y_ref: torch.Tensor) -> torch.Tensor:
    """The Euclidean distance from each image to the nearest reference image of its target class
    (the "KNN distance" of the MI toolbox, in pixel space). ``[N]``."""
    _check_images(images)
    classes = _check_classes(target_class, len(images))
    _check_images(x_ref, "x_ref")
    check_labels("y_ref", y_ref, 10)
    if len(x_ref) != len(y_ref):
        raise ValueError(f"x_ref and y_ref must have the same length, got {len(x_ref)} and {len(y_ref)}")
    distances = torch.cdist(images, x_ref)
    same = classes[:, None] == y_ref[None, :]
    if not bool(same.any(1).all()):
        raise ValueError("y_ref must contain every target class at least once")
    return distances.masked_fill(~same, math.inf).min(1).values


@dataclass
class InversionResult:
    """Recovered images ``[N, 64]``, their target classes, the cost per step (mean over images), and
    the budget spent per image: ``forward`` and ``backward`` passes of the target (a query is one
    forward pass of one image)."""

    images: torch.Tensor
    classes: torch.Tensor
    costs: list[float]
    forward: int
    backward: int


def _check_prior(prior: str, tv_weight) -> float:
    check_choice("prior", prior, ("none", "tv"))
    return check_float("tv_weight", tv_weight, 0)


def _start(init, n: int) -> torch.Tensor:
    """The starting images: ``init`` (checked, copied) or a uniform grey 0.5 image per target."""
    if init is None:
        return torch.full((n, N_PIXELS), 0.5)
    _check_images(init, "init")
    if len(init) != n:
        raise ValueError(f"init must hold one image per target class ({n}), got {len(init)}")
    return init.detach().clone().clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# 3. White-box gradient inversion (MI-Face)
# ---------------------------------------------------------------------------------------------


def mi_face(model: nn.Module, target_class, steps: int = 200, lr: float = 0.1, prior: str = "none",
            tv_weight: float = 0.02, init: torch.Tensor | None = None, cost: str = "log") -> InversionResult:
    """MI-Face (Fredrikson et al. 2015, Alg. 1): gradient descent on the input of the cost

        c(x) = 1 - p_y(x) + lambda * TV(x)       (cost="paper": Alg. 1 with the prior as AuxTerm)
        c(x) = -log p_y(x) + lambda * TV(x)      (cost="log", the default)

    projected onto the pixel box [0, 1] after every step. The paper's ``1 - p_y`` has a vanishing
    gradient wherever the softmax is saturated at ``p_y ~ 0`` (the gradient is ``p_y`` times that
    of the log), so a start the model finds very unlike ``y`` never moves; the log form (the
    cross-entropy "identity loss" of later attacks such as GMI, Zhang et al. 2020) has the same
    minimiser and does not stall. ``target_class`` is an int or one class per
    image (a batch of independent attacks); ``init`` the starting images (default: all grey, which
    is also the attack's no-op baseline). ``prior="tv"`` adds the total-variation prior with weight
    ``tv_weight`` (the paper has no prior, only a denoising "Process" step; ART's ``MIFace`` has
    neither). Needs the model's gradients: white-box access. One step costs one forward and one
    backward pass per image.
    """
    check_module("model", model)
    steps = check_int("steps", steps, minimum=1)
    lr = check_positive_float("lr", lr)
    tv_weight = _check_prior(prior, tv_weight)
    check_choice("cost", cost, ("log", "paper"))
    n_classes = _n_outputs(model) or 10
    if init is not None:
        _check_images(init, "init")
    n = len(init) if init is not None else (1 if isinstance(target_class, int) else len(target_class))
    classes = _check_classes(target_class, n, n_classes)
    x = _start(init, n).requires_grad_(True)
    costs = []
    for _ in range(steps):
        log_p = torch.log_softmax(model(x), dim=-1).gather(1, classes[:, None]).squeeze(1)
        value = -log_p if cost == "log" else 1 - log_p.exp()
        if prior == "tv":
            value = value + tv_weight * total_variation(x)
        (grad,) = torch.autograd.grad(value.sum(), x)
        with torch.no_grad():
            x -= lr * grad
            x.clamp_(0, 1)
        costs.append(float(value.detach().mean()))
    return InversionResult(x.detach(), classes, costs, forward=steps, backward=steps)


# ---------------------------------------------------------------------------------------------
# 4. Black-box inversion from the released vector (NES)
# ---------------------------------------------------------------------------------------------


def _released_log_prob(api: ProbabilityAPI, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``log`` of the released probability of each image's class (0 released -> log 1e-12)."""
    with torch.no_grad():
        return api(x).gather(1, classes[:, None]).squeeze(1).clamp_min(1e-12).log()


def nes_gradient(api: ProbabilityAPI, x: torch.Tensor, target_class, samples: int = 20, sigma: float = 0.05,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Antithetic NES estimate of the gradient of ``log p_released(y | x)`` from queries alone
    (Wierstra et al. 2014; as used for black-box attacks by Ilyas et al. 2018):

        g = 1 / (2 n sigma) * sum_i [F(x + sigma u_i) - F(x - sigma u_i)] u_i,   u_i ~ N(0, I)

    for a batch ``x`` ``[N, 64]``; costs ``2 * samples`` queries per image. The query points
    ``x +- sigma * u`` are not projected onto [0, 1] (the API accepts any input); digits' pixels take
    17 levels (k / 16), so ``sigma = 0.05`` is below one level: an API that accepted only valid
    images would need a larger ``sigma``. ``generator`` seeds the
    directions."""
    if not isinstance(api, ProbabilityAPI):
        raise TypeError(f"api must be a ProbabilityAPI (or one of its wrappers), got {type(api).__name__}")
    _check_images(x, "x")
    classes = _check_classes(target_class, len(x), api.n_classes or 10)
    samples = check_int("samples", samples, minimum=1)
    sigma = check_positive_float("sigma", sigma)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    n = len(x)
    u = torch.randn((samples, n, N_PIXELS), generator=generator)
    points = torch.cat([x + sigma * u, x - sigma * u]).reshape(-1, N_PIXELS)
    values = _released_log_prob(api, points, classes.repeat(2 * samples)).view(2, samples, n)
    return ((values[0] - values[1])[..., None] * u).sum(0) / (2 * samples * sigma)


def nes_inversion(api: ProbabilityAPI, target_class, queries: int = 2000, samples: int = 20,
                  sigma: float = 0.05, lr: float = 0.02, prior: str = "none", tv_weight: float = 0.02,
                  init: torch.Tensor | None = None, seed: int = 0) -> InversionResult:
    """Black-box MI-Face: ascend ``log p_released(y | x) - lambda * TV(x)`` with signed steps of size
    ``lr`` along the NES estimate (:func:`nes_gradient`; the signed step of Ilyas et al. 2018's
    black-box PGD), projected onto [0, 1]. The prior's gradient is exact (the attacker knows its own
    prior; it costs no query). ``queries`` is the budget per image: ``queries // (2 * samples)`` steps.
    A released probability that does not move (rounded, truncated to 0, label only) gives a zero
    estimate: the image stays where it started, or follows the prior alone.
    """
    if not isinstance(api, ProbabilityAPI):
        raise TypeError(f"api must be a ProbabilityAPI (or one of its wrappers), got {type(api).__name__}")
    samples = check_int("samples", samples, minimum=1)
    queries = check_int("queries", queries, minimum=2 * samples)
    sigma = check_positive_float("sigma", sigma)
    lr = check_positive_float("lr", lr)
    tv_weight = _check_prior(prior, tv_weight)
    seed = check_int("seed", seed, minimum=0)
    if init is not None:
        _check_images(init, "init")
    n = len(init) if init is not None else (1 if isinstance(target_class, int) else len(target_class))
    classes = _check_classes(target_class, n, api.n_classes or 10)
    x = _start(init, n)
    generator = torch.Generator().manual_seed(seed)
    steps = queries // (2 * samples)
    costs = []
    for _ in range(steps):
        grad = nes_gradient(api, x, classes, samples, sigma, generator)
        if prior == "tv":
            y = x.clone().requires_grad_(True)
            (tv_grad,) = torch.autograd.grad(total_variation(y).sum(), y)
            grad = grad - tv_weight * tv_grad
        x = (x + lr * grad.sign()).clamp(0, 1)
        costs.append(float(-_released_log_prob(api, x, classes).mean()))  # monitoring; not counted
    api.queries -= steps * n  # the monitoring queries above are the notebook's, not the attack's
    return InversionResult(x, classes, costs, forward=steps * 2 * samples, backward=0)


# ---------------------------------------------------------------------------------------------
# 5. Training-based inversion (Yang et al. 2019)
# ---------------------------------------------------------------------------------------------


class InversionNet(nn.Module):
    """An inversion network (Yang et al. 2019): released vector -> image.

    The encoder takes the vector as Yang et al.'s code does: truncated to its ``truncation`` largest
    entries (``None``: all), ``log(p) + c`` clipped at 0 (so a released 0 is a 0 input), divided by
    ``c`` to lie in [0, 1]. The decoder is an MLP with a sigmoid output (the paper's is a
    transposed-convolution net for 64x64 faces; 8x8 digits need none). The encoded input is then
    standardised with a per-entry ``shift`` and ``scale`` that :func:`train_inverter` sets from the
    auxiliary queries (not in Yang et al.: without it a flattened vector, e.g. behind a
    temperature, encodes to a narrow band near 1 that the decoder learns slowly from).
    """

    def __init__(self, n_classes: int = 10, hidden: int = 256, truncation: int | None = None, c: float = 50.0):
        super().__init__()
        self.n_classes = check_int("n_classes", n_classes, minimum=2)
        hidden = check_int("hidden", hidden, minimum=1)
        self.truncation = None if truncation is None else check_int("truncation", truncation, minimum=1,
                                                                        maximum=n_classes)
        self.c = check_positive_float("c", c)
        self.register_buffer("shift", torch.zeros(n_classes))
        self.register_buffer("scale", torch.ones(n_classes))
        self.decoder = nn.Sequential(nn.Linear(n_classes, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, N_PIXELS), nn.Sigmoid())

    def encode(self, released: torch.Tensor) -> torch.Tensor:
        check_tensor("released", released, ndim=2, kind="float", nonempty=True)
        if released.shape[1] != self.n_classes:
            raise ValueError(f"released must be [N, {self.n_classes}] vectors, got shape {tuple(released.shape)}")
        if self.truncation is not None:
            top = released.topk(self.truncation, dim=-1)
            released = torch.zeros_like(released).scatter(-1, top.indices, top.values)
        encoded = (released.clamp_min(0).log() + self.c).clamp_min(0) / self.c
        return (encoded - self.shift) / self.scale

    def forward(self, released: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(released))


def train_inverter(api: ProbabilityAPI, x_aux: torch.Tensor, epochs: int = 300, hidden: int = 256,
                   truncation: int | None = None, lr: float = 1e-3, batch_size: int = 64,
                   seed: int = 0) -> tuple[InversionNet, list[float]]:
    """Train an :class:`InversionNet` on the attacker's auxiliary images: query the API once per image
    (``len(x_aux)`` queries, whatever it releases), set the input standardisation from those
    vectors, and fit image = net(released) with MSE and Adam (Yang et al. 2019's training objective). Returns the network (eval mode) and the loss of each epoch."""
    if not isinstance(api, ProbabilityAPI):
        raise TypeError(f"api must be a ProbabilityAPI (or one of its wrappers), got {type(api).__name__}")
    _check_images(x_aux, "x_aux")
    epochs = check_int("epochs", epochs, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    lr = check_positive_float("lr", lr)
    seed = check_int("seed", seed, minimum=0)
    with torch.no_grad():
        released = api(x_aux)
    seed_everything(seed)
    net = InversionNet(released.shape[1], hidden, truncation)
    with torch.no_grad():
        encoded = net.encode(released)  # shift 0, scale 1 still: the raw encoding
        net.shift.copy_(encoded.mean(0))
        net.scale.copy_(encoded.std(0).clamp_min(1e-3))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    history = shuffled_epochs(lambda index: nn.functional.mse_loss(net(released[index]), x_aux[index]),
                              optimizer, len(x_aux), epochs, batch_size, seed)
    return net.eval(), history


def invert(net: InversionNet, api: ProbabilityAPI, x_secret: torch.Tensor) -> torch.Tensor:
    """Reconstruct private images from what the API releases about them (one query each)."""
    if not isinstance(net, InversionNet):
        raise TypeError(f"net must be an InversionNet, got {type(net).__name__}")
    if not isinstance(api, ProbabilityAPI):
        raise TypeError(f"api must be a ProbabilityAPI (or one of its wrappers), got {type(api).__name__}")
    _check_images(x_secret, "x_secret")
    with torch.no_grad():
        return net(api(x_secret))


# ---------------------------------------------------------------------------------------------
# The independent evaluation classifier (a zoo model of this chapter)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluatorRecipe(zoo.Recipe):
    """A small CNN on the 8x8 digits: another architecture, seed and optimiser setting than the target
    MLP, trained on the same private half (as the evaluation classifiers of the MI literature are),
    so that an image the target was fooled into accepting is not automatically accepted here."""

    channels: int = 16
    epochs: int = 60
    lr: float = 2e-3
    seed: int = 1

    def __post_init__(self):
        check_int("channels", self.channels, minimum=1)
        check_int("epochs", self.epochs, minimum=1)
        check_positive_float("lr", self.lr)
        check_int("seed", self.seed, minimum=0)

    def fingerprints(self) -> list[str]:
        return ["sklearn-digits"]

    def build(self) -> nn.Module:
        c = self.channels
        return nn.Sequential(nn.Unflatten(1, (1, *IMAGE_SHAPE)), nn.Conv2d(1, c, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Dropout(0.25), nn.Linear(2 * c * 16, 10))

    def train(self, folder: Path, progress: bool) -> None:
        from safetensors.torch import save_file

        from companion.train import train_classifier

        roles = digit_roles()
        seed_everything(self.seed)
        model = self.build()
        started = time.perf_counter()
        losses = train_classifier(model, roles.x_private, roles.y_private, epochs=self.epochs, lr=self.lr,
                                  seed=self.seed, progress=progress)
        seconds = time.perf_counter() - started
        save_file(model.state_dict(), str(Path(folder) / "model.safetensors"))
        zoo.write_card(folder, self, model, seconds, losses)

    def read(self, folder: Path):
        from safetensors.torch import load_file

        model = self.build()
        model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
        return model.eval(), None


zoo.register(EVALUATOR, EvaluatorRecipe())


# ---------------------------------------------------------------------------------------------
# 6. What logits give away about the model itself
# ---------------------------------------------------------------------------------------------


def _check_prompts(model, tokenizer, texts) -> list[list[int]]:
    from companion.metrics import trained_context

    check_lm_and_tokenizer(model, tokenizer)
    check_texts("texts", texts, nonempty_each=True)
    context = trained_context(model)
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    for i, ids in enumerate(encoded):
        if context is not None and len(ids) > context:
            raise ValueError(f"texts[{i}] has {len(ids)} tokens, more than the model's trained context ({context})")
    return encoded


@torch.no_grad()
def last_logits(model, tokenizer, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """The full next-token logit vector after each prompt, ``[N, V]`` (float64): what an API that
    returned raw logits would show. Prompts are right-padded; each row is read at its last real
    token. Every prompt must fit in the model's trained context."""
    from companion.train import pad_batch

    encoded = _check_prompts(model, tokenizer, texts)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    rows = []
    for first in range(0, len(encoded), batch_size):
        ids, mask = pad_batch(encoded[first: first + batch_size], pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        last = mask.sum(1) - 1
        rows.append(logits[torch.arange(len(ids)), last.to(device)].double().cpu())
    return torch.cat(rows)


def singular_values(logits: torch.Tensor) -> torch.Tensor:
    """Singular values of a ``[N, V]`` matrix of logit vectors, largest first (Carlini et al. 2024:
    rows of ``W h`` span at most ``hidden`` dimensions, so the spectrum collapses after
    index ``hidden``, or ``hidden + 1`` for log-probabilities, which add a multiple of the all-ones
    vector)."""
    check_tensor("logits", logits, ndim=2, kind="float", finite=True, nonempty=True)
    return torch.linalg.svdvals(logits.double())


def hidden_size_estimate(values: torch.Tensor, rtol: float = 1e-6) -> int:
    """The numerical rank of a logit matrix from its singular values: how many exceed ``rtol`` times
    the largest (``torch.linalg.matrix_rank``'s rule). Logits computed in float32 carry about seven
    significant digits, so directions a million times weaker than the strongest are rounding noise;
    what is left is the hidden size (Carlini et al. 2024 read the same cliff off a plot of the
    sorted singular values). Needs more logit vectors than the hidden size."""
    check_tensor("values", values, ndim=1, kind="float", finite=True, nonempty=True)
    rtol = check_float("rtol", rtol, 0, 1, open_minimum=True, open_maximum=True)
    if bool((values < 0).any()):
        raise ValueError("values must be singular values (>= 0)")
    if float(values.max()) <= 0:
        raise ValueError("values must not all be 0")
    return int((values > rtol * values.max()).sum())


class LogprobAPI:
    """A simulated LM API in the style of the public ones: for a prompt it returns the ``top_k``
    most likely next tokens with their log-probabilities, after adding ``logit_bias`` (token id ->
    bias, clipped to +-``max_bias`` as real APIs clip it) to the logits. Counts :attr:`queries`.
    The simulation caches each prompt's logits, so many biased queries cost one forward pass here;
    the query count is what a real API would bill."""

    def __init__(self, model, tokenizer, top_k: int = 5, max_bias: float = 100.0):
        check_lm_and_tokenizer(model, tokenizer)
        self.model, self.tokenizer = model, tokenizer
        self.vocab = int(model.get_output_embeddings().weight.shape[0])
        self.top_k = check_int("top_k", top_k, minimum=1, maximum=self.vocab)
        self.max_bias = check_positive_float("max_bias", max_bias)
        self.queries = 0
        self._cache: dict[str, torch.Tensor] = {}

    def top_logprobs(self, prompt: str, logit_bias: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token ids [top_k], log-probabilities [top_k])`` of the next token after ``prompt``."""
        check_str("prompt", prompt)
        if logit_bias is not None and not isinstance(logit_bias, dict):
            raise TypeError(f"logit_bias must be a dict of token id -> bias, got {type(logit_bias).__name__}")
        if prompt not in self._cache:
            self._cache[prompt] = last_logits(self.model, self.tokenizer, [prompt])[0]
        logits = self._cache[prompt].clone()
        for token, bias in (logit_bias or {}).items():
            check_int("logit_bias token", token, minimum=0, maximum=self.vocab - 1)
            logits[token] += max(-self.max_bias, min(self.max_bias, check_float("logit_bias value", bias)))
        self.queries += 1
        top = torch.log_softmax(logits, -1).topk(self.top_k)
        return top.indices, top.values


def recover_logits(api: LogprobAPI, prompt: str, bias: float | None = None) -> torch.Tensor:
    """The full logit vector (up to an additive constant: relative to the most likely token) from a
    top-k log-prob API with logit bias (the idea of Carlini et al. 2024): each query lifts ``k - 1``
    new tokens by ``bias`` into the top-k; the unbiased most likely token ``r`` fills the last slot,
    and ``z_i - z_r = (logprob_i - bias) - logprob_r``. Costs ``ceil((V - 1) / (k - 1))`` queries
    (plus one to find ``r``)."""
    if not isinstance(api, LogprobAPI):
        raise TypeError(f"api must be a LogprobAPI, got {type(api).__name__}")
    check_str("prompt", prompt)
    if api.top_k < 2:
        raise ValueError(f"api.top_k must be >= 2 to recover logits with logit bias, got {api.top_k}")
    bias = api.max_bias if bias is None else check_positive_float("bias", bias)
    ids, logprobs = api.top_logprobs(prompt)
    reference = int(ids[0])
    recovered = torch.full((api.vocab,), math.nan, dtype=torch.float64)
    recovered[reference] = 0.0
    others = [t for t in range(api.vocab) if t != reference]
    step = api.top_k - 1
    for first in range(0, len(others), step):
        group = others[first: first + step]
        ids, logprobs = api.top_logprobs(prompt, {t: bias for t in group})
        found = dict(zip(ids.tolist(), logprobs.tolist()))
        if reference not in found or any(t not in found for t in group):
            raise RuntimeError("a biased token or the reference token fell out of the top-k; lower bias")
        for t in group:
            recovered[t] = (found[t] - bias) - found[reference]
    return recovered


# ---------------------------------------------------------------------------------------------
# 7. The Secret Sharer, taken to extraction
# ---------------------------------------------------------------------------------------------

#: A canary: a vault code bound to a named owner.
CANARY_TEMPLATE = "The vault code of {owner} is {secret} ."


def plant_canaries(owners: list[str], repeats: tuple[int, ...] = (0, 1, 4, 16, 64), per_level: int = 32,
                   digits: int = 6, seed: int = 0) -> list[data.Canary]:
    """Canaries "The vault code of <owner> is d d d d d d ." (Carlini et al. 2019): ``per_level``
    owners per repetition count, one random secret each (``10 ** digits`` possible values, digits
    space-separated so each is one token). Insert them into training text with
    :func:`companion.data.insert_canaries`; ``repeats = 0`` canaries are never inserted (the control)."""
    check_texts("owners", owners, nonempty_each=True)
    per_level, digits, seed = data.check_canary_plan(repeats, per_level, digits, seed)
    if len(set(owners)) < len(repeats) * per_level:
        raise ValueError(f"owners must hold at least {len(repeats) * per_level} distinct names "
                         f"(len(repeats) * per_level), got {len(set(owners))}")
    import random

    rng = random.Random(seed + 104729)
    distinct = list(dict.fromkeys(owners))
    canaries = []
    for i, owner in enumerate(distinct[: len(repeats) * per_level]):
        secret = " ".join(str(rng.randrange(10)) for _ in range(digits))
        canaries.append(data.Canary(text=CANARY_TEMPLATE.format(owner=owner, secret=secret), secret=secret,
                                    repeats=int(repeats[i // per_level])))
    return canaries


def canary_prefix(canary: data.Canary) -> str:
    """The text before the secret ("The vault code of Ada Lovelace is"): what the attacker knows."""
    if not isinstance(canary, data.Canary):
        raise TypeError(f"canary must be a companion.data.Canary, got {type(canary).__name__}")
    return canary.text[: canary.text.index(canary.secret)].rstrip()


@dataclass(frozen=True)
class VaultRecipe(zoo.Recipe):
    """``tiny-llama`` fine-tuned on its own training mixture with owner-bound canaries planted
    (:func:`plant_canaries` on the first member names): documentation windows and packed member
    biographies with the canary copies shuffled in, as the base model was trained."""

    base: str = "tiny-llama"
    repeats: tuple[int, ...] = (0, 1, 4, 16, 64)
    per_level: int = 32
    steps: int = 240
    batch_size: int = 32
    bio_per_batch: int = 16
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self):
        check_str("base", self.base)
        if not isinstance(self.repeats, tuple) or not self.repeats:
            raise TypeError(f"repeats must be a non-empty tuple of ints, got {self.repeats!r}")
        for r in self.repeats:
            check_int("repeats[i]", r, minimum=0)
        check_int("per_level", self.per_level, minimum=1)
        check_int("steps", self.steps, minimum=1)
        check_int("batch_size", self.batch_size, minimum=2)
        check_int("bio_per_batch", self.bio_per_batch, minimum=1, maximum=self.batch_size - 1)
        check_positive_float("lr", self.lr)
        check_int("seed", self.seed, minimum=0)

    def base_recipe(self) -> zoo.LMRecipe:
        base = zoo.recipe_of(self.base)
        if not isinstance(base, zoo.LMRecipe):
            raise ValueError(f"base must name a zoo language model, got {self.base!r}")
        return base

    def fingerprints(self) -> list[str]:
        self.base_recipe()
        return [zoo.entry_folder(self.base).name]

    def canaries(self) -> list[data.Canary]:
        world = zoo.corpus(self.base_recipe().tokenizer.world_seed).world
        owners = [world.people[i].name for i in world.indices("member")]
        return plant_canaries(owners, self.repeats, self.per_level, seed=self.seed)

    def train(self, folder: Path, progress: bool) -> None:
        from companion.train import mixed_batches, pack_sequences, stream_windows, train_causal_lm

        base = zoo.load(self.base)
        model, tok = base.model, base.tokenizer
        recipe = self.base_recipe()
        source = zoo.corpus(recipe.tokenizer.world_seed)
        doc_tokens: list[int] = []
        for doc in source.train_docs:
            doc_tokens += tok(doc.text)["input_ids"] + [tok.eos_token_id]
        texts = data.insert_canaries(source.world.texts("member"), self.canaries(), seed=self.seed)
        bios = [tok(text)["input_ids"] + [tok.eos_token_id] for text in texts]
        pools = [stream_windows(doc_tokens, recipe.context), pack_sequences(bios, recipe.context, tok.pad_token_id)]
        seed_everything(self.seed)
        started = time.perf_counter()
        batches = mixed_batches(pools, [self.batch_size - self.bio_per_batch, self.bio_per_batch], seed=self.seed)
        losses = train_causal_lm(model, batches, steps=self.steps, lr=self.lr, progress=progress)
        seconds = time.perf_counter() - started
        zoo.save_lm(folder, model, tok)
        zoo.write_card(folder, self, model, seconds, losses, bio_windows=len(pools[1][0]))

    def read(self, folder: Path):
        return zoo.read_lm(folder)


VAULT_MODEL = "tiny-llama-vault"
zoo.register(VAULT_MODEL, VaultRecipe())


def _digit_tokens(tokenizer, alphabet: str) -> list[int]:
    """The token id of " d" for each symbol of ``alphabet``; each must be one token."""
    check_str("alphabet", alphabet)
    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet must not repeat symbols, got {alphabet!r}")
    ids = []
    for symbol in alphabet:
        encoded = tokenizer(" " + symbol, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ValueError(f"alphabet symbol {symbol!r} must be one token after a space, the tokenizer gives "
                             f"{len(encoded)}; use a tokenizer that keeps digits whole or extend the search")
        ids.append(encoded[0])
    return ids


def secret_log_probs(model, tokenizer, prefixes: list[str], secrets: list[str], batch_size: int = 256) -> torch.Tensor:
    """``log p(secret | prefix)`` in nats, summed over the secret's tokens, for each pair (the
    Secret Sharer's log-perplexity with the sign flipped: higher = more likely). Reads
    :func:`companion.metrics.token_log_probs` of ``prefix + " " + secret``, within the trained context."""
    from companion.metrics import token_log_probs

    check_lm_and_tokenizer(model, tokenizer)
    check_texts("prefixes", prefixes, nonempty_each=True)
    check_texts("secrets", secrets, nonempty_each=True)
    if len(prefixes) != len(secrets):
        raise ValueError(f"prefixes and secrets must have the same length, got {len(prefixes)} and {len(secrets)}")
    check_int("batch_size", batch_size, minimum=1)
    _check_prompts(model, tokenizer, [f"{p} {s}" for p, s in zip(prefixes, secrets)])
    lengths = [len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in secrets]
    stats = token_log_probs(model, tokenizer, [f"{p} {s}" for p, s in zip(prefixes, secrets)], batch_size)
    return torch.stack([s["log_prob"][-n:].sum() for s, n in zip(stats, lengths)])


def random_secrets(n: int, digits: int = 6, seed: int = 0) -> list[str]:
    """``n`` uniformly random space-separated digit strings (the reference secrets R)."""
    n = check_int("n", n, minimum=1)
    digits = check_int("digits", digits, minimum=1, maximum=12)
    generator = torch.Generator().manual_seed(check_int("seed", seed, minimum=0))
    draws = torch.randint(0, 10, (n, digits), generator=generator)
    return [" ".join(map(str, row.tolist())) for row in draws]


def _check_scores(canary_score, reference_scores) -> tuple[float, torch.Tensor]:
    score = check_float("canary_score", canary_score)
    check_tensor("reference_scores", reference_scores, ndim=1, kind="float", finite=True, nonempty=True)
    return score, reference_scores.double()


def exposure(canary_score: float, reference_scores: torch.Tensor) -> float:
    """Exposure by interpolation (Carlini et al. 2019's definition, with a sampled R): with the canary's
    rank among itself and the ``|R|`` references (higher score = more likely; ties go to the
    references, as TF-Privacy's ``compute_exposure_interpolation`` breaks them),

        exposure = log2(|R| + 1) - log2(rank),

    so a canary ranked first has the cap ``log2(|R| + 1)`` and a typical unseen one about 1 bit."""
    score, refs = _check_scores(canary_score, reference_scores)
    rank = 1 + int((refs >= score).sum())
    return math.log2(len(refs) + 1) - math.log2(rank)


def exposure_extrapolated(canary_score: float, reference_scores: torch.Tensor) -> float:
    """Exposure by extrapolation (Carlini et al. 2019): fit a skew-normal distribution to
    the references' negative log-likelihoods and return ``-log2 P(NLL <= canary NLL)``; unlike
    :func:`exposure` it is not capped at ``log2(|R| + 1)`` (but is only as good as the fit's tail).
    The probability is floored at 1e-300."""
    from scipy import stats

    score, refs = _check_scores(canary_score, reference_scores)
    if len(refs) < 10:
        raise ValueError(f"reference_scores must hold at least 10 values to fit a distribution, got {len(refs)}")
    shape, loc, scale = stats.skewnorm.fit((-refs).numpy())
    cdf = float(stats.skewnorm.cdf(-score, shape, loc, scale))
    return float(-math.log2(max(cdf, 1e-300)))


@torch.no_grad()
def extract_secret(model, tokenizer, prefixes: list[str], digits: int = 6, beam: int = 8,
                   top_k: int | None = None, alphabet: str = "0123456789", batch_size: int = 256
                   ) -> list[list[tuple[str, float]]]:
    """Recover each prefix's secret with no candidate list: beam search over the logits, restricted
    to the ``alphabet``'s tokens (Carlini et al. 2019 use a shortest-path search over the
    same tree). Returns, per prefix, the ``beam`` best ``(secret, log p)`` pairs, best first.

    ``top_k`` simulates an API that shows only the ``k`` most likely tokens with their log-probs, with
    a logit bias lifting the alphabet's tokens above all others (so the ``k`` shown are the ``k``
    best symbols): each beam is extended only by those. With ``top_k >= beam`` the result equals the
    full search (a beam's best extensions are among its own ``beam`` best); ``top_k = 1`` is greedy.
    Each step reads the whole prefix again (no KV cache): ``digits`` forward passes of
    ``len(prefixes) * beam`` rows.
    """
    from companion.train import pad_batch

    _check_prompts(model, tokenizer, prefixes)
    digits = check_int("digits", digits, minimum=1, maximum=12)
    beam = check_int("beam", beam, minimum=1)
    symbols = _digit_tokens(tokenizer, alphabet)
    top_k = len(symbols) if top_k is None else check_int("top_k", top_k, minimum=1, maximum=len(symbols))
    batch_size = check_int("batch_size", batch_size, minimum=1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    allowed = torch.tensor(symbols)
    # one hypothesis = (prefix index, token list, log p); all prefixes advance together
    hyps = [[(tokenizer(p)["input_ids"], [], 0.0)] for p in prefixes]
    for _ in range(digits):
        flat = [(i, h) for i, group in enumerate(hyps) for h in group]
        scores = []
        for first in range(0, len(flat), batch_size):
            chunk = flat[first: first + batch_size]
            ids, mask = pad_batch([h[0] + h[1] for _, h in chunk], pad)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            last = logits[torch.arange(len(chunk)), (mask.sum(1) - 1).to(device)].float().cpu()
            scores.append(torch.log_softmax(last, -1)[:, allowed])
        scores = torch.cat(scores)
        shown = scores.topk(top_k, dim=-1)
        new = [[] for _ in prefixes]
        for row, (i, (prompt, tokens, total)) in enumerate(flat):
            for value, j in zip(shown.values[row].tolist(), shown.indices[row].tolist()):
                new[i].append((prompt, tokens + [symbols[j]], total + value))
        hyps = [sorted(group, key=lambda h: -h[2])[:beam] for group in new]
    decode = {t: s for t, s in zip(symbols, alphabet)}
    return [[(" ".join(decode[t] for t in tokens), total) for _, tokens, total in group] for group in hyps]


def extract_secret_via_api(api: LogprobAPI, prefixes: list[str], digits: int = 6, beam: int = 5,
                           alphabet: str = "0123456789") -> list[list[tuple[str, float]]]:
    """:func:`extract_secret` as an attacker who has only a top-k log-prob API with logit bias
    (:class:`LogprobAPI`) must run it: one query per hypothesis and step, sending the hypothesis as
    text (``prefix + " 4 8 1"``) with the bias ``api.max_bias`` on every symbol's token, so the
    ``api.top_k`` symbols shown are that hypothesis's best ones. The API returns log-probabilities
    renormalised *after* the bias, so the score of a symbol is ``log p(symbol | prefix, next token
    is a symbol)`` (up to ``e^-bias`` of the other tokens' mass), not the unconstrained ``log p``
    that :func:`extract_secret` sums: the ranking of hypotheses can differ. The queries are counted
    on ``api.queries``: ``len(prefixes) * (1 + beam * (digits - 1))`` at most."""
    if not isinstance(api, LogprobAPI):
        raise TypeError(f"api must be a LogprobAPI, got {type(api).__name__}")
    _check_prompts(api.model, api.tokenizer, prefixes)
    digits = check_int("digits", digits, minimum=1, maximum=12)
    beam = check_int("beam", beam, minimum=1)
    symbols = _digit_tokens(api.tokenizer, alphabet)
    lift = {token: api.max_bias for token in symbols}
    decode = dict(zip(symbols, alphabet))
    found = []
    for prefix in prefixes:
        hyps = [("", 0.0)]  # (the symbols so far, as text after the prefix; summed score)
        for _ in range(digits):
            extended = []
            for text, total in hyps:
                ids, log_probs = api.top_logprobs(prefix + text, lift)
                for token, value in zip(ids.tolist(), log_probs.tolist()):
                    if token in decode:  # a top_k above the alphabet's size shows other tokens too
                        extended.append((f"{text} {decode[token]}", total + value))
            hyps = sorted(extended, key=lambda h: -h[1])[:beam]
        found.append([(text.strip(), total) for text, total in hyps])
    return found
