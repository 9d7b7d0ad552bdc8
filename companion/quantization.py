"""Quantization from scratch: affine quantizers, post-training quantization (PTQ), and quantization-aware
training (QAT) with fake quantization and the straight-through estimator.

The module reads as the chapter does:

1. **The quantizer.** A real number ``x`` becomes an integer code
   ``q = clamp(round(x / s) + z, q_min, q_max)`` and is read back as ``x_hat = (q - z) * s``
   (Jacob et al. 2018, Eq. 1). Symmetric quantizers fix ``z = 0``; asymmetric (affine) ones choose
   ``z`` so that the range ``[lo, hi]`` (which always contains 0) maps onto ``[q_min, q_max]``. One
   ``(s, z)`` pair is shared per tensor, per channel (per row of the last dimension: an output channel
   of a weight, a token of an activation) or per group of ``group_size`` consecutive entries.
2. **Ranges.** Min-max uses the full range; a percentile range clips the tails; the MSE range
   searches one shared clipping ratio of the min-max range that minimises ``||x - x_hat||^2`` (a
   simplified grid search; PyTorch's ``HistogramObserver`` instead moves both ends independently).
3. **Fake quantization and the STE.** ``round`` has zero gradient almost everywhere, so QAT uses the
   straight-through estimator (Bengio et al. 2013): the forward pass sees ``x_hat``, the backward pass
   treats quantize-dequantize as the identity; the *clipped* STE passes the gradient only where
   ``x`` is not clipped (Hubara et al. 2016; Jacob et al. 2018). "Not clipped" is decided on the code
   before clamping, as PyTorch's fake-quantize ops do; deciding it on the real interval
   ``[(q_min - z) s, (q_max - z) s]`` instead would also zero the gradient of values that round onto the
   edge codes, which an asymmetric min-max range produces (its rounded zero point shifts that interval by
   up to half a step). :func:`zero_gradient_fraction` measures how many gradients the clip zeroes.
4. **LSQ** (Esser et al. 2020, "Learned Step Size Quantization", Eqs. 1-3 and Sec. 2.2): the step ``s``
   is a parameter trained by backpropagation, its gradient scaled by ``g = 1 / sqrt(N * Q_P)``. The paper
   has one step per layer (``N`` = the layer's weights) and trains with SGD; one step per group (``N`` =
   the group size) is our extension. Under Adam(W) alone a constant gradient factor such as ``g`` would
   cancel out of the update (up to ``eps``); but ``train.train_causal_lm`` clips the *global* gradient
   norm, and the steps' gradients count in that norm, so ``g`` changes how much the clip scales down every
   other parameter's gradient (``benchmarks/lsq_grad_scale.py`` measures it).
5. **Layers.** :func:`prepare_qat` swaps every linear layer of a model's decoder blocks (or of a plain
   network) for a :class:`FakeQuantLinear`; the same prepared model, not trained, *is* PTQ with
   round-to-nearest weights (static activation ranges come from :func:`calibrate_ptq`). :func:`convert`
   then stores the weights as real packed int8 / int4 / int2 codes (:class:`QuantizedLinear`).

Everything is plain PyTorch and works unchanged on a Hugging Face model of either layer type
(``nn.Linear`` or GPT-2's ``Conv1D``); embeddings and the LM head stay in full precision.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from companion.checks import (check_bool, check_choice, check_float, check_int, check_module, check_tensor,
                              check_token_ids)
from companion.runtime import median_seconds
from companion.pruning import block_layers, decoder_blocks, is_prunable, weight_matrix

GRANULARITIES = ("per_tensor", "per_channel", "per_token", "per_group")
RANGES = ("minmax", "percentile", "mse")
STES = ("plain", "clipped")


# ---------------------------------------------------------------------------------------------
# 1. The quantizer: integer grid, scale and zero point
# ---------------------------------------------------------------------------------------------


def _check_bits(bits) -> int:
    return check_int("bits", bits, minimum=2, maximum=8)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer codes of a ``bits``-bit quantizer.

    Symmetric: ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (the "restricted" signed range: zero sits in the middle
    and ``-x`` quantizes to ``-q(x)``; at 2 bits this is ternary, {-1, 0, 1}). Asymmetric: the
    ``2^b`` codes ``[-2^(b-1), 2^(b-1) - 1]`` shifted by a zero point.
    """
    bits = _check_bits(bits)
    check_bool("symmetric", symmetric)
    half = 2 ** (bits - 1)
    return (-(half - 1), half - 1) if symmetric else (-half, half - 1)


def _rows(x: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """``x`` viewed as ``[n_groups, group]``: every row shares one scale and zero point."""
    if granularity == "per_tensor":
        return x.reshape(1, -1)
    if granularity in ("per_channel", "per_token"):
        return x.reshape(-1, x.shape[-1])
    return x.reshape(-1, group_size)


def _check_layout(x, granularity, group_size) -> tuple[str, int | None]:
    check_choice("granularity", granularity, GRANULARITIES)
    if granularity == "per_group":
        group_size = check_int("group_size", group_size, minimum=1)
        if x.ndim == 0 or x.shape[-1] % group_size:
            raise ValueError(f"group_size must divide the last dimension of x ({tuple(x.shape)[-1:]}), "
                             f"got group_size={group_size}")
    elif group_size is not None:
        raise ValueError(f"group_size is only used with granularity='per_group', got group_size={group_size!r} "
                         f"with granularity={granularity!r}")
    return granularity, group_size


def _check_x(x) -> torch.Tensor:
    return check_tensor("x", x, kind="float", finite=True, nonempty=True)


_QUANTILE_LIMIT = 1 << 24


def _sorted_quantiles(rows: torch.Tensor, percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.quantile``'s default (linear interpolation between order statistics) per row, by sorting:
    no size limit (a Hugging Face weight can hold more than the 2^24 values ``torch.quantile`` accepts)."""
    ordered = rows.float().sort(dim=1).values
    n = ordered.shape[1]
    ends = []
    for q in (1 - percentile / 100, percentile / 100):
        position = q * (n - 1)
        below = min(int(math.floor(position)), n - 1)
        above = min(below + 1, n - 1)
        frac = position - below
        ends.append((ordered[:, below: below + 1] * (1 - frac) + ordered[:, above: above + 1] * frac).to(rows.dtype))
    return ends[0], ends[1]


def _row_range(rows: torch.Tensor, method: str, percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` per row, both ``[n, 1]``, from the min-max or a percentile of the row."""
    if method == "percentile":
        if rows.numel() > _QUANTILE_LIMIT:  # torch.quantile refuses inputs over 2^24 values
            return _sorted_quantiles(rows, percentile)
        q = torch.tensor([1 - percentile / 100, percentile / 100], dtype=rows.dtype)
        lo, hi = torch.quantile(rows.float(), q.float(), dim=1, keepdim=True).to(rows.dtype)
    else:
        lo, hi = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    return lo, hi


def _scale_zero(lo, hi, qmin, qmax, symmetric):
    """Scale and zero point that map ``[min(lo, 0), max(hi, 0)]`` onto ``[qmin, qmax]``."""
    eps = torch.finfo(torch.float32).eps
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp(min=eps)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=eps)
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero


def _quant(rows, scale, zero, qmin, qmax):
    return torch.clamp(torch.round(rows / scale) + zero, qmin, qmax)


def choose_qparams(x: torch.Tensor, bits: int = 8, granularity: str = "per_tensor", symmetric: bool = True,
                   group_size: int | None = None, method: str = "minmax", percentile: float = 99.9
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``s`` and zero point ``z`` (each ``[n_groups, 1]``) for ``x`` at the given granularity.

    ``method``: ``"minmax"`` (the full range), ``"percentile"`` (clip to the ``percentile``-th and
    ``100 - percentile``-th percentiles of each group) or ``"mse"`` (search a clipping ratio
    ``r`` in ``[0.2, 1]`` of the min-max range per group, keeping the one with the least
    ``||x - x_hat||^2``: one ratio scales both ends, the "grid search" of many PTQ papers; PyTorch's
    ``HistogramObserver`` searches the two ends independently).
    """
    x = _check_x(x)
    qmin, qmax = qrange(bits, symmetric)
    granularity, group_size = _check_layout(x, granularity, group_size)
    check_choice("method", method, RANGES)
    percentile = check_float("percentile", percentile, 50, 100, open_minimum=True)
    rows = _rows(x.detach(), granularity, group_size)
    lo, hi = _row_range(rows, "percentile" if method == "percentile" else "minmax", percentile)
    if method != "mse":
        return _scale_zero(lo, hi, qmin, qmax, symmetric)
    best, best_error = None, None
    for ratio in torch.linspace(0.2, 1.0, 33).tolist():
        scale, zero = _scale_zero(lo * ratio, hi * ratio, qmin, qmax, symmetric)
        error = ((rows - (_quant(rows, scale, zero, qmin, qmax) - zero) * scale) ** 2).sum(1, keepdim=True)
        if best is None:
            best, best_error = (scale, zero), error
        else:
            better = error < best_error
            best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]))
            best_error = torch.minimum(error, best_error)
    return best


@dataclass
class QTensor:
    """A quantized tensor: integer ``codes`` (int8 storage, values in ``[qmin, qmax]``), per-group
    ``scale`` and ``zero_point`` (``[n_groups, 1]``) and what is needed to read it back."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    granularity: str
    group_size: int | None
    shape: tuple[int, ...]

    def dequantize(self) -> torch.Tensor:
        """``(q - z) * s`` in the original shape."""
        rows = _rows(self.codes.float(), self.granularity, self.group_size)
        return ((rows - self.zero_point) * self.scale).reshape(self.shape)

    def storage_bytes(self, scale_bytes: int = 2) -> int:
        """Bytes as :func:`convert` stores them: the codes packed as :func:`_pack` packs them (2 or 4 bits:
        4 or 2 codes per byte; every other width one byte per code), and each group a scale (fp16 by
        default) and, if asymmetric, an int8 zero point."""
        per_byte = 8 // self.bits if self.bits in (2, 4) else 1
        codes = math.ceil(self.codes.numel() / per_byte)
        zeros = 0 if bool((self.zero_point == 0).all()) else self.zero_point.numel()
        return codes + self.scale.numel() * scale_bytes + zeros


def quantize_tensor(x: torch.Tensor, bits: int = 8, granularity: str = "per_tensor", symmetric: bool = True,
                    group_size: int | None = None, method: str = "minmax", percentile: float = 99.9) -> QTensor:
    """Round-to-nearest quantization of ``x``: ``q = clamp(round(x / s) + z, q_min, q_max)`` with
    ``(s, z)`` from :func:`choose_qparams`. ``quantize_tensor(x, ...).dequantize()`` is ``x_hat``."""
    scale, zero = choose_qparams(x, bits, granularity, symmetric, group_size, method, percentile)
    qmin, qmax = qrange(bits, symmetric)
    codes = _quant(_rows(x.detach(), granularity, group_size), scale, zero, qmin, qmax)
    return QTensor(codes.to(torch.int8).reshape(x.shape), scale, zero, bits, granularity, group_size,
                   tuple(x.shape))


# ---------------------------------------------------------------------------------------------
# 2. Fake quantization with the straight-through estimator
# ---------------------------------------------------------------------------------------------


def _fake_rows(rows, scale, zero, qmin, qmax, ste):
    """Quantize-dequantize ``rows`` in the forward pass; in the backward pass the identity (``plain``),
    or the identity where the code before clamping, ``round(x / s) + z``, lies in ``[qmin, qmax]`` and
    zero where the clamp cut it (``clipped``; the mask of PyTorch's ``torch.fake_quantize_*`` ops).
    Under a min-max range every value rounds into the grid, so the two agree exactly."""
    codes = torch.round(rows / scale) + zero
    x_hat = (torch.clamp(codes, qmin, qmax) - zero) * scale
    if ste == "clipped":
        inside = ((codes >= qmin) & (codes <= qmax)).to(rows.dtype)
        return x_hat.detach() + (rows - rows.detach()) * inside
    return rows + (x_hat - rows).detach()


def fake_quantize(x: torch.Tensor, bits: int = 8, granularity: str = "per_tensor", symmetric: bool = True,
                  group_size: int | None = None, method: str = "minmax", ste: str = "clipped",
                  scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """``x_hat`` with a straight-through gradient (Bengio et al. 2013; the clipped variant zeroes the
    gradient outside the representable range, as in Hubara et al. 2016 and Jacob et al. 2018).

    The range is chosen from the detached ``x`` by ``method`` (dynamic quantization), unless a
    precomputed ``scale`` and ``zero_point`` (``[n_groups, 1]``, e.g. calibrated static ranges) are given.
    """
    x = check_tensor("x", x, kind="float", nonempty=True)
    check_choice("ste", ste, STES)
    qmin, qmax = qrange(bits, symmetric)
    granularity, group_size = _check_layout(x, granularity, group_size)
    rows = _rows(x, granularity, group_size)
    if scale is None:
        if zero_point is not None:
            raise ValueError("zero_point needs scale too; got zero_point without scale")
        scale, zero_point = choose_qparams(x, bits, granularity, symmetric, group_size, method)
    else:
        check_tensor("scale", scale, kind="float", finite=True)
        zero_point = torch.zeros_like(scale) if zero_point is None else check_tensor("zero_point", zero_point,
                                                                                     finite=True)
        if bool((scale <= 0).any()):
            raise ValueError(f"scale must be > 0, got a minimum of {float(scale.min())}")
        if scale.numel() not in (1, rows.shape[0]) or zero_point.shape != scale.shape:
            raise ValueError(f"scale and zero_point must have 1 or {rows.shape[0]} entries (one per group) and "
                             f"the same shape, got {tuple(scale.shape)} and {tuple(zero_point.shape)}")
        scale, zero_point = scale.reshape(-1, 1), zero_point.reshape(-1, 1)
    return _fake_rows(rows, scale, zero_point, qmin, qmax, ste).reshape(x.shape)


def zero_gradient_fraction(x: torch.Tensor, bits: int = 8, granularity: str = "per_tensor",
                           symmetric: bool = True, group_size: int | None = None,
                           method: str = "minmax") -> float:
    """Fraction of the entries of ``x`` to which the clipped STE gives zero gradient (their code
    ``round(x / s) + z`` falls outside ``[q_min, q_max]``); the plain STE gives none. Zero for min-max
    ranges, symmetric or not; positive for ranges that clip (percentile, MSE)."""
    x = _check_x(x)
    probe = x.detach().clone().requires_grad_(True)
    fake_quantize(probe, bits, granularity, symmetric, group_size, method, ste="clipped").sum().backward()
    return float((probe.grad == 0).float().mean())


# ---------------------------------------------------------------------------------------------
# 3. LSQ: a learned step size
# ---------------------------------------------------------------------------------------------


def _grad_scale(value: torch.Tensor, factor: float) -> torch.Tensor:
    """``value`` in the forward pass, gradient multiplied by ``factor`` in the backward pass."""
    scaled = value * factor
    return (value - scaled).detach() + scaled


_LSQ_EPS = 1e-8


def _positive_step(step: torch.Tensor) -> torch.Tensor:
    return step.abs().clamp(min=_LSQ_EPS)


class LSQQuantizer(nn.Module):
    """Learned Step Size Quantization (Esser et al. 2020).

    ``x_hat = round(clamp(x / s, -Q_N, Q_P)) * s`` (their Eqs. 1-2) with a straight-through ``round``,
    so that ``d x_hat / d s = -x/s + round(x/s)`` inside the range and ``-Q_N`` or ``Q_P`` outside
    (Eq. 3); that gradient is multiplied by ``g = 1 / sqrt(N * Q_P)`` where ``N`` is the number of
    values sharing the step (Sec. 2.2). Signed data use ``Q_N = 2^(b-1)``, ``Q_P = 2^(b-1) - 1``.
    The step is initialised on the first call as ``2 <|x|> / sqrt(Q_P)`` (per row of ``x`` viewed as
    ``[groups, N]`` with ``groups`` steps), as the paper does.
    """

    def __init__(self, bits: int = 4, groups: int = 1, signed: bool = True):
        super().__init__()
        bits = _check_bits(bits)
        self.groups = check_int("groups", groups, minimum=1)
        check_bool("signed", signed)
        self.bits, self.signed = bits, signed
        self.q_n, self.q_p = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        # one step per group, stored 1-D: like biases and norm gains it must get no weight decay, and
        # train_causal_lm decays exactly the parameters with ndim >= 2
        self.step = nn.Parameter(torch.ones(self.groups))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, kind="float", nonempty=True)
        if x.numel() % self.groups:
            raise ValueError(f"x has {x.numel()} values, not divisible into groups={self.groups}")
        rows = x.reshape(self.groups, -1)
        if not bool(self.initialized):
            with torch.no_grad():
                self.step.copy_(2 * rows.abs().mean(1) / math.sqrt(self.q_p))
                self.step.clamp_(min=_LSQ_EPS)
                self.initialized.fill_(True)
        # an optimiser step can push a small step to or below 0: use |s| kept above eps, as torchao
        # clamps its learned scales (identity while every step stays above eps)
        step = _grad_scale(_positive_step(self.step).reshape(-1, 1), 1.0 / math.sqrt(rows.shape[1] * self.q_p))
        v = torch.clamp(rows / step, -self.q_n, self.q_p)
        v = v + (torch.round(v) - v).detach()
        return (v * step).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# 4. Layers: a fake-quantized linear layer, prepare / calibrate / convert
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how (the chapter's W4A8 is ``QuantConfig(4, activation_bits=8)``).

    Weights: ``weight_bits`` in [2, 8], per output channel or per group of ``group_size`` inputs,
    symmetric or not, range by ``weight_range`` (``"minmax"``, ``"percentile"``, ``"mse"``, or ``"lsq"``
    for a learned step per group). Activations (the layer's input): ``activation_bits=None`` for
    weight-only, else dynamic (ranges per token from each input) or static (``activation_static``:
    one range per layer, set by :func:`calibrate_ptq`).
    """

    weight_bits: int = 4
    weight_granularity: str = "per_group"
    group_size: int | None = 32
    weight_symmetric: bool = False
    weight_range: str = "minmax"
    activation_bits: int | None = None
    activation_granularity: str = "per_token"
    activation_symmetric: bool = False
    activation_static: bool = False
    ste: str = "clipped"

    def __post_init__(self):
        check_int("weight_bits", self.weight_bits, minimum=2, maximum=8)
        check_choice("weight_granularity", self.weight_granularity, ("per_tensor", "per_channel", "per_group"))
        if self.weight_granularity == "per_group":
            check_int("group_size", self.group_size, minimum=1)
        elif self.group_size is not None:
            raise ValueError(f"group_size must be None unless weight_granularity='per_group', got {self.group_size!r}")
        check_bool("weight_symmetric", self.weight_symmetric)
        check_choice("weight_range", self.weight_range, (*RANGES, "lsq"))
        if self.weight_range == "lsq" and not self.weight_symmetric:
            raise ValueError("weight_range='lsq' learns a symmetric step: it needs weight_symmetric=True")
        if self.activation_bits is not None:
            check_int("activation_bits", self.activation_bits, minimum=2, maximum=8)
        check_choice("activation_granularity", self.activation_granularity, ("per_token", "per_tensor"))
        check_bool("activation_symmetric", self.activation_symmetric)
        check_bool("activation_static", self.activation_static)
        if self.activation_static and self.activation_granularity != "per_tensor":
            raise ValueError("activation_static=True keeps one calibrated range per layer: it needs "
                             f"activation_granularity='per_tensor', got {self.activation_granularity!r}")
        check_choice("ste", self.ste, STES)

    @property
    def name(self) -> str:
        w = f"W{self.weight_bits}"
        return w if self.activation_bits is None else f"{w}A{self.activation_bits}"


def _check_config(config) -> QuantConfig:
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    return config


def _weight_layout(config: QuantConfig, weight: torch.Tensor) -> tuple[str, int | None]:
    granularity, group = config.weight_granularity, config.group_size
    if granularity == "per_group" and weight.shape[1] % group:
        raise ValueError(f"group_size={group} must divide the layer's in_features ({weight.shape[1]})")
    return granularity, group


def _weight_rows(layer: nn.Module) -> torch.Tensor:
    """The weight that gets quantized, as a matrix ``[out, in]``: the linear layer's (transposed view
    for ``Conv1D``), or a convolution's ``[out, in, kh, kw]`` kernel flattened to ``[out, in·kh·kw]``."""
    if isinstance(layer, nn.Conv2d):
        return layer.weight.reshape(layer.out_channels, -1)
    return weight_matrix(layer)


class FakeQuantLinear(nn.Module):
    """A linear layer (``nn.Linear`` or GPT-2 ``Conv1D``, kept as ``.layer``) whose weight and, optionally,
    input are fake-quantized in every forward pass: ``y = q_a(x) q_w(W)^T + b``. The float weight is
    what the optimiser updates; the quantized one is what the forward pass sees."""

    def __init__(self, layer: nn.Module, config: QuantConfig):
        super().__init__()
        if not isinstance(layer, nn.Module) or not is_prunable(layer):
            raise TypeError(f"layer must be an nn.Linear or a GPT-2 Conv1D, got {type(layer).__name__}")
        self._setup(layer, config)

    def _setup(self, layer: nn.Module, config: QuantConfig) -> None:
        self.config = _check_config(config)
        self.layer = layer
        weight = _weight_rows(layer)
        self.granularity, self.group_size = _weight_layout(config, weight)
        self.lsq = None
        if config.weight_range == "lsq":
            groups = {"per_tensor": 1, "per_channel": weight.shape[0]}.get(
                self.granularity, weight.numel() // (self.group_size or 1))
            self.lsq = LSQQuantizer(config.weight_bits, groups)
        self.register_buffer("act_scale", torch.ones(1, 1))
        self.register_buffer("act_zero", torch.zeros(1, 1))
        self.register_buffer("calibrated", torch.tensor(False))
        self.observing = False

    def quantized_weight(self) -> torch.Tensor:
        """``q_w(W)`` as ``[out, in]`` floats (:func:`_weight_rows`; with the STE, so gradients reach ``W``)."""
        weight, c = _weight_rows(self.layer), self.config
        if self.lsq is not None:
            return self.lsq(weight)
        return fake_quantize(weight, c.weight_bits, self.granularity, c.weight_symmetric, self.group_size,
                             c.weight_range, c.ste)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.activation_bits is None or self.observing:
            return x
        if c.activation_static:
            if not bool(self.calibrated):
                raise RuntimeError("static activation ranges are not set: run calibrate_ptq(model, calib) first")
            return fake_quantize(x, c.activation_bits, "per_tensor", c.activation_symmetric, ste=c.ste,
                                 scale=self.act_scale, zero_point=self.act_zero)
        return fake_quantize(x, c.activation_bits, c.activation_granularity, c.activation_symmetric, ste=c.ste)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.layer.bias)


class FakeQuantConv2d(FakeQuantLinear):
    """A 2-D convolution (``nn.Conv2d``, kept as ``.layer``) fake-quantized the same way: a convolution is a
    linear map applied to every input patch, so its weight ``[out, in, kh, kw]`` is quantized as the
    matrix ``[out, in·kh·kw]`` (per output channel, PyTorch's default for quantized convolutions; groups
    run along the flattened kernel). Dynamic per-token activation ranges become one range per input
    image. :func:`convert` keeps no integer convolution kernel: it rejects these layers."""

    def __init__(self, layer: nn.Module, config: QuantConfig):
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"layer must be an nn.Conv2d, got {type(layer).__name__}")
        if layer.padding_mode != "zeros":
            raise ValueError(f"layer.padding_mode must be 'zeros', got {layer.padding_mode!r}")
        nn.Module.__init__(self)
        self._setup(layer, config)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.activation_granularity == "per_token" and not self.config.activation_static:
            return super().quantize_input(x.reshape(x.shape[0], -1)).reshape(x.shape)
        return super().quantize_input(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.layer
        return F.conv2d(self.quantize_input(x), self.quantized_weight().reshape(conv.weight.shape), conv.bias,
                        conv.stride, conv.padding, conv.dilation, conv.groups)


def _quantizable(module: nn.Module) -> bool:
    return is_prunable(module) or isinstance(module, nn.Conv2d)


def _target_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, attribute, layer)`` for every layer to quantize: the linear layers inside the decoder
    blocks of an LM (embeddings and LM head excluded), or every linear and ``nn.Conv2d`` layer of a
    network without blocks."""
    try:
        roots = list(decoder_blocks(model))
    except ValueError:
        roots = [model]
    found = []
    for root in roots:
        for name, layer in (block_layers(root).items() if root is not model else
                            ((n, m) for n, m in model.named_modules() if _quantizable(m))):
            parent_name, _, attribute = name.rpartition(".")
            found.append((root.get_submodule(parent_name) if parent_name else root, attribute, layer))
    return found


def prepare_qat(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Swap the model's linear layers (see :func:`_target_layers`) for :class:`FakeQuantLinear`, in place,
    and return the model. Evaluated as it is, the prepared model is round-to-nearest PTQ; trained, it is
    QAT (the same flow as torchao's ``quantize_(model, QATConfig(..., step="prepare"))``)."""
    check_module("model", model)
    config = _check_config(config)
    if any(isinstance(m, (FakeQuantLinear, QuantizedLinear)) for m in model.modules()):
        raise ValueError("model is already prepared or converted; prepare_qat a fresh copy")
    targets = _target_layers(model)
    if not targets:
        raise ValueError(f"model has no nn.Linear, Conv1D or Conv2d layer to quantize ({type(model).__name__})")
    for _, _, layer in targets:  # every layer's shape fits before anything is swapped
        _weight_layout(config, _weight_rows(layer))
    for parent, attribute, layer in targets:
        fake = FakeQuantConv2d if isinstance(layer, nn.Conv2d) else FakeQuantLinear
        setattr(parent, attribute, fake(layer, config))
    return model


def fake_quant_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """The :class:`FakeQuantLinear` layers of a prepared model, by qualified name."""
    check_module("model", model)
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def _run(model, data, batch_size):
    for start in range(0, len(data), batch_size):
        chunk = data[start: start + batch_size]
        if chunk.dtype in (torch.int64, torch.int32):
            model(input_ids=chunk)
        else:
            model(chunk)


@torch.no_grad()
def calibrate_ptq(model: nn.Module, data: torch.Tensor, method: str = "minmax", percentile: float = 99.9,
                  batch_size: int = 16, max_samples: int = 1 << 18, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Static activation ranges for a model prepared with ``activation_static=True``: run the
    calibration ``data`` (token ids ``[n, T]`` for an LM, inputs ``[n, d]`` otherwise), observe every
    fake-quantized layer's input, and set one scale and zero point per layer from its min-max, its
    ``percentile``, or the MSE-optimal clipping (:func:`choose_qparams`). Returns ``{layer: (lo, hi)}``.

    The min and max are exact; percentile and MSE ranges are computed on a uniform random subsample of
    about ``max_samples`` values per layer (drawn with ``seed``, each batch contributing in proportion
    to its size, so every channel and token is represented; a fixed stride would not be: a stride that
    divides the width keeps the same few channels). Calibration data must never be evaluation data.
    """
    check_module("model", model)
    check_choice("method", method, RANGES)
    check_float("percentile", percentile, 50, 100, open_minimum=True)
    check_int("batch_size", batch_size, minimum=1)
    check_int("max_samples", max_samples, minimum=16)
    check_int("seed", seed, minimum=0)
    check_tensor("data", data, nonempty=True)
    if data.dtype in (torch.int64, torch.int32):
        check_token_ids("data", data, model)
    layers = {n: m for n, m in fake_quant_layers(model).items() if m.config.activation_static}
    if not layers:
        raise ValueError("model has no FakeQuantLinear with activation_static=True: prepare_qat(model, "
                         "QuantConfig(..., activation_bits=8, activation_granularity='per_tensor', "
                         "activation_static=True)) first")
    seen = {name: {"lo": math.inf, "hi": -math.inf, "samples": []} for name in layers}
    generator = torch.Generator().manual_seed(seed)

    def observe(name):
        def hook(module, args):
            x = args[0].detach().float()
            # this batch's share of the budget: its examples out of all len(data) examples
            keep = min(x.numel(), math.ceil(max_samples * x.shape[0] / len(data)))
            x = x.reshape(-1)
            entry = seen[name]
            entry["lo"], entry["hi"] = min(entry["lo"], float(x.min())), max(entry["hi"], float(x.max()))
            entry["samples"].append(x[torch.randperm(x.numel(), generator=generator)[:keep]])
        return hook

    was_training = model.training
    model.eval()
    handles = [m.register_forward_pre_hook(observe(n)) for n, m in layers.items()]
    for m in layers.values():  # observe float inputs: activation quantization is off while calibrating
        m.observing = True
    try:
        _run(model, data, batch_size)
    finally:
        for handle in handles:
            handle.remove()
        for m in layers.values():
            m.observing = False
        model.train(was_training)
    ranges = {}
    for name, m in layers.items():
        c, entry = m.config, seen[name]
        sample = torch.cat(entry["samples"])[:max_samples]
        if method == "minmax":
            lo, hi = torch.tensor([[entry["lo"]]]), torch.tensor([[entry["hi"]]])
            scale, zero = _scale_zero(lo, hi, *qrange(c.activation_bits, c.activation_symmetric),
                                      c.activation_symmetric)
        else:
            scale, zero = choose_qparams(sample, c.activation_bits, "per_tensor", c.activation_symmetric,
                                         method=method, percentile=percentile)
        m.act_scale.copy_(scale.reshape(1, 1))
        m.act_zero.copy_(zero.reshape(1, 1))
        m.calibrated.fill_(True)
        qmin, qmax = qrange(c.activation_bits, c.activation_symmetric)
        ranges[name] = (float((qmin - zero) * scale), float((qmax - zero) * scale))
    return ranges


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[0, 2^bits)`` packed ``8 // bits`` per byte (bits in 2, 4, 8; other widths use a
    byte per code)."""
    if bits not in (2, 4):
        return codes.to(torch.uint8)
    per = 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, (-flat.numel()) % per)).reshape(-1, per)
    packed = torch.zeros(flat.shape[0], dtype=torch.uint8)
    for i in range(per):
        packed |= flat[:, i] << (bits * i)
    return packed


def _unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    if bits not in (2, 4):
        return packed.reshape(-1)[:numel]
    per, mask = 8 // bits, 2**bits - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, dim=1).reshape(-1)[:numel]


class QuantizedLinear(nn.Module):
    """A converted layer: weights stored as real packed integer codes (``packed``: uint8 holding 1, 2 or 4
    codes per byte), fp16 scales and int8 zero points, dequantized in each forward pass (a weight-only
    kernel written in PyTorch: honest about size, not a speed-up on a CPU). With 8-bit symmetric
    per-channel weights and 8-bit symmetric dynamic per-token activations it instead computes the
    product in integers with ``torch._int_mm`` (int8 x int8 -> int32, then rescaled; see
    :func:`int_mm_is_exact` for where that kernel is wrong); ``packed`` then holds the int8 codes
    transposed, ``[in, out]``."""

    def __init__(self, fake: FakeQuantLinear):
        super().__init__()
        if not isinstance(fake, FakeQuantLinear):
            raise TypeError(f"fake must be a FakeQuantLinear, got {type(fake).__name__}")
        if isinstance(fake, FakeQuantConv2d):
            raise ValueError("fake is a FakeQuantConv2d: convert stores linear layers only (no integer "
                             "convolution kernel here); evaluate the fake-quantized model instead")
        c = self.config = fake.config
        with torch.no_grad():
            weight = weight_matrix(fake.layer).detach().float()
            if fake.lsq is not None:
                rows = weight.reshape(fake.lsq.groups, -1)
                scale = _positive_step(fake.lsq.step.detach()).reshape(-1, 1)
                zero = torch.zeros_like(scale)
                qmin, qmax = -fake.lsq.q_n, fake.lsq.q_p
                codes = _quant(rows, scale, zero, qmin, qmax)
            else:
                qt = quantize_tensor(weight, c.weight_bits, fake.granularity, c.weight_symmetric, fake.group_size,
                                     c.weight_range)
                scale, zero, codes = qt.scale, qt.zero_point, _rows(qt.codes.float(), qt.granularity, qt.group_size)
                qmin = qrange(c.weight_bits, c.weight_symmetric)[0]
        self.out_features, self.in_features = weight.shape
        self.bits, self.qmin = c.weight_bits, qmin
        self.granularity, self.group_size = fake.granularity, fake.group_size
        self.int8_matmul = (c.weight_bits == 8 and c.weight_symmetric and c.weight_granularity == "per_channel"
                            and c.weight_range != "lsq" and c.activation_bits == 8 and c.activation_symmetric
                            and not c.activation_static and c.activation_granularity == "per_token")
        if self.int8_matmul:  # int8 codes, transposed for torch._int_mm: [in, out]
            self.register_buffer("packed", codes.reshape(self.out_features, -1).to(torch.int8).t().contiguous())
        else:
            self.register_buffer("packed", _pack((codes - qmin).to(torch.int16), c.weight_bits))
        self.register_buffer("scale", scale.to(torch.float16))
        symmetric = bool((zero == 0).all())
        self.register_buffer("zero", None if symmetric else zero.to(torch.int8))
        bias = fake.layer.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("act_scale", fake.act_scale.clone())
        self.register_buffer("act_zero", fake.act_zero.clone())

    def codes(self) -> torch.Tensor:
        """The integer codes ``[out, in]`` as int16 (unpacked)."""
        if self.int8_matmul:
            return self.packed.t().to(torch.int16)
        numel = self.out_features * self.in_features
        return (_unpack(self.packed, self.bits, numel).to(torch.int16) + self.qmin).reshape(
            self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        rows = _rows(self.codes().float(), self.granularity, self.group_size)
        zero = 0 if self.zero is None else self.zero.float()
        return ((rows - zero) * self.scale.float()).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if self.int8_matmul:
            rows = x.reshape(-1, x.shape[-1])
            a_scale = (rows.abs().amax(1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).eps)
            a_int = torch.clamp(torch.round(rows / a_scale), -127, 127).to(torch.int8)
            out = _int8_matmul(a_int, self.packed) * a_scale * self.scale.float().reshape(1, -1)
            out = out.reshape(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias
        if c.activation_bits is not None:
            if c.activation_static:
                x = fake_quantize(x, c.activation_bits, "per_tensor", c.activation_symmetric, ste=c.ste,
                                  scale=self.act_scale, zero_point=self.act_zero)
            else:
                x = fake_quantize(x, c.activation_bits, c.activation_granularity, c.activation_symmetric, ste=c.ste)
        return F.linear(x, self.dequantized_weight(), self.bias)


_INT_MM_EXACT: bool | None = None


def int_mm_is_exact() -> bool:
    """Whether ``torch._int_mm`` multiplies int8 matrices exactly on this machine (checked once with
    extreme values). On a CPU whose oneDNN is limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``, which the
    course sets for reproducibility) it does not: without VNNI the u8 x s8 dot products saturate at
    16 bits, and the results are silently wrong."""
    global _INT_MM_EXACT
    if _INT_MM_EXACT is None:
        a = torch.tensor([[-127, -127, 127, 127] * 8] * 32, dtype=torch.int8)
        b = torch.full((32, 32), -127, dtype=torch.int8)
        try:
            _INT_MM_EXACT = torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long())
        except RuntimeError:
            _INT_MM_EXACT = False
    return _INT_MM_EXACT


def _int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for int8 matrices as exact integer sums: ``torch._int_mm`` where it is exact, else float64
    arithmetic on the codes (exact while ``in_features * 127^2 < 2^53``, i.e. for any real layer; float32
    would be exact only up to 1,040 inputs)."""
    if int_mm_is_exact():
        return torch._int_mm(a, b).float()
    return (a.double() @ b.double()).float()


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Replace every :class:`FakeQuantLinear` of a prepared (and perhaps QAT-trained) model by a
    :class:`QuantizedLinear` holding real integer codes, in place; returns the model. The converted model
    computes what the fake-quantized one did, up to fp16 scale rounding."""
    check_module("model", model)
    layers = fake_quant_layers(model)
    if not layers:
        raise ValueError("model has no FakeQuantLinear layer to convert: call prepare_qat(model, config) "
                         "first (convert before prepare)")
    convs = [name for name, fake in layers.items() if isinstance(fake, FakeQuantConv2d)]
    if convs:  # refuse before swapping anything, so that a model is never left half-converted
        raise ValueError(f"model has FakeQuantConv2d layers ({', '.join(convs[:3])}"
                         f"{', ...' if len(convs) > 3 else ''}): convert stores linear layers only (no integer "
                         "convolution kernel here); evaluate the fake-quantized model instead")
    for name, fake in layers.items():
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attribute, QuantizedLinear(fake))
    return model


# ---------------------------------------------------------------------------------------------
# 5. Measuring: perplexity within the context, size, latency
# ---------------------------------------------------------------------------------------------


def _check_windows(model, windows, batch_size) -> None:
    """The arguments of :func:`window_perplexity` and :func:`window_nll`: token windows ``[n, T]`` of at
    least 2 ids the model knows, no longer than the context it was trained on, and a batch size >= 1."""
    check_module("model", model)
    check_tensor("windows", windows, ndim=2, kind="int", nonempty=True)
    if windows.shape[1] < 2:
        raise ValueError(f"windows must have at least 2 tokens each, got shape {tuple(windows.shape)}")
    check_token_ids("windows", windows, model)
    check_int("batch_size", batch_size, minimum=1)
    trained = getattr(getattr(model, "config", None), "trained_context", None)
    if isinstance(trained, int) and windows.shape[1] > trained:
        raise ValueError(f"windows have {windows.shape[1]} tokens, more than the {trained} the model was trained on "
                         "(config.trained_context): cut them shorter")


@torch.no_grad()
def window_perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 32) -> float:
    """``exp`` of the mean next-token NLL over token windows ``[n, T]`` (all tokens real; cut long text
    with ``train.stream_windows`` so that ``T`` stays within the context the model was trained on, which a
    zoo model records as ``config.trained_context``). Non-overlapping windows in the training format:
    each window's first tokens are predicted from a short prefix, as in training; cheaper than
    ``metrics.perplexity``'s sliding windows, which give every token a long prefix."""
    _check_windows(model, windows, batch_size)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start: start + batch_size]
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Summed next-token NLL of each window ``[n, T]`` (float64, ``[n]``), with the checks of
    :func:`window_perplexity`: ``exp(window_nll(...).sum() / (n * (T - 1)))`` is that perplexity. The
    per-window values are what :func:`paired_perplexity_difference` resamples."""
    _check_windows(model, windows, batch_size)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(windows), batch_size):
        ids = windows[start: start + batch_size]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        out.append(nll.reshape(len(ids), -1).double().sum(1))
    model.train(was_training)
    return torch.cat(out)


def paired_perplexity_difference(nll_a: torch.Tensor, nll_b: torch.Tensor, tokens_per_window: int,
                                 n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
                                 groups: torch.Tensor | None = None) -> tuple[float, float, float]:
    """``ppl_a - ppl_b`` on the same evaluation windows and a paired percentile-bootstrap interval
    (Efron & Tibshirani 1993, ch. 13): each replicate resamples with replacement, the same draw for both,
    and recomputes both perplexities. ``nll_a``/``nll_b`` are :func:`window_nll` outputs (summed NLL per
    window), ``tokens_per_window`` the predicted tokens per window (``T - 1``). Returns
    ``(difference, lower, upper)``. It measures what another sample of evaluation text would change, not
    what another calibration draw or seed would.

    ``groups`` (one integer per window, e.g. :attr:`LMSplits.valid_clean_doc`) makes it a cluster
    bootstrap (Davison & Hinkley 1997, §3.8): a replicate draws as many groups as there are, with
    replacement, and takes all the windows of each drawn group. Windows cut from one document share its
    topic and difficulty, so resampling them as independent understates the spread; resample documents.
    Without ``groups`` every window is its own group."""
    a = check_tensor("nll_a", nll_a, ndim=1, kind="float", finite=True, nonempty=True).double()
    b = check_tensor("nll_b", nll_b, ndim=1, kind="float", finite=True, nonempty=True).double()
    if a.shape != b.shape:
        raise ValueError(f"nll_b must have one value per window of nll_a ({a.shape[0]}), got {b.shape[0]}")
    tokens = check_int("tokens_per_window", tokens_per_window, minimum=1)
    n_resamples = check_int("n_resamples", n_resamples, minimum=100)
    confidence = check_float("confidence", confidence, minimum=0.5, maximum=0.999)
    check_int("seed", seed, minimum=0)
    n = a.shape[0]
    members = None  # [group, window] membership; None: every window its own group
    if groups is not None:
        groups = check_tensor("groups", groups, ndim=1, kind="int")
        if groups.shape[0] != n:
            raise ValueError(f"groups must have one value per window of nll_a ({n}), got {groups.shape[0]}")
        labels = torch.unique(groups)
        if len(labels) < 2:
            raise ValueError(f"groups must hold at least 2 distinct groups to resample, got {len(labels)}")
        members = (groups[None, :] == labels[:, None]).double()
    k = n if members is None else len(members)
    draw = torch.randint(0, k, (n_resamples, k), generator=torch.Generator().manual_seed(seed))
    counts = torch.zeros(n_resamples, k, dtype=torch.float64)
    counts.scatter_add_(1, draw, torch.ones_like(draw, dtype=torch.float64))
    weights = counts if members is None else counts @ members  # [replicate, window]: times drawn
    drawn = weights.sum(1) * tokens  # predicted tokens in each replicate (varies with groups)
    replicates = torch.exp(weights @ a / drawn) - torch.exp(weights @ b / drawn)
    tail = (1 - confidence) / 2
    lower, upper = torch.quantile(replicates, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    difference = float(torch.exp(a.sum() / (n * tokens)) - torch.exp(b.sum() / (n * tokens)))
    return difference, lower, upper


def recovered(full: float, ptq: float, qat: float) -> float:
    """torchao's "% of degradation recovered": ``(ptq - qat) / (ptq - full)`` (1 = all of it)."""
    full, ptq, qat = (check_float(n, v, allow_inf=False) for n, v in (("full", full), ("ptq", ptq), ("qat", qat)))
    if ptq == full:
        raise ValueError(f"ptq must differ from full (no degradation to recover), got ptq = full = {ptq}")
    return (ptq - qat) / (ptq - full)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's ``state_dict`` as ``torch.save`` writes it (parameters and buffers as stored)."""
    check_module("model", model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@torch.no_grad()
def latency(model: nn.Module, inputs: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of one forward pass on ``inputs`` (token ids for an LM); machine-dependent."""
    check_module("model", model)
    check_tensor("inputs", inputs, nonempty=True)
    repeats = check_int("repeats", repeats, minimum=1)
    check_int("warmup", warmup, minimum=0)
    call = (lambda: model(input_ids=inputs)) if inputs.dtype == torch.long else (lambda: model(inputs))
    model.eval()
    return median_seconds(call, repeats=repeats, warmup=warmup)


# ---------------------------------------------------------------------------------------------
# 6. The chapter's data and its one fine-tuning procedure (shared by QAT, the control and torchao)
# ---------------------------------------------------------------------------------------------


CLEAN_BELOW = 0.5  # chapter 08's threshold: a held-out doc sharing >= half its word 12-grams is a near-copy


@dataclass(frozen=True)
class LMSplits:
    """Token windows for the course LM, all of ``context`` tokens (never longer than it was trained on):
    ``docs`` and ``bios`` (the training mixture, for fine-tuning), ``calib`` (training-split documentation
    windows for PTQ calibration), ``valid`` (all the held-out documentation) and ``valid_clean`` (only the
    held-out documents that share fewer than ``CLEAN_BELOW`` of their word 12-grams with the training
    documents: ``data.split_documents`` holds out whole documents, but some held-out topics repeat training
    text, and calibration and fine-tuning both read the training documents). ``overlap`` is that share for
    each held-out document (:func:`companion.data.overlap_with`). Evaluate on ``valid_clean``.
    ``valid_doc`` / ``valid_clean_doc`` give, for each window of ``valid`` / ``valid_clean``, the index
    (into ``zoo.corpus().valid_docs``) of the document that holds most of its tokens (the windows are cut
    from one stream, so a window can straddle two documents): pass it as ``groups`` to
    :func:`paired_perplexity_difference` to resample documents rather than windows."""

    docs: tuple[torch.Tensor, torch.Tensor]
    bios: tuple[torch.Tensor, torch.Tensor]
    calib: torch.Tensor
    valid: torch.Tensor
    valid_clean: torch.Tensor
    overlap: tuple[float, ...]
    valid_doc: torch.Tensor | None = None
    valid_clean_doc: torch.Tensor | None = None


def lm_splits(tokenizer, context: int = 128, calib_windows: int = 32, seed: int = 0, world_seed: int = 0) -> LMSplits:
    """The documentation split of ``zoo.corpus`` cut into ``context``-token windows, the member biographies
    packed into windows, and ``calib_windows`` training windows drawn with ``seed`` for calibration; the
    held-out documentation both whole (``valid``) and without its near-copies of training text
    (``valid_clean``, see :class:`LMSplits`)."""
    from companion import data, zoo
    from companion.train import pack_sequences, stream_windows

    context = check_int("context", context, minimum=2)
    calib_windows = check_int("calib_windows", calib_windows, minimum=1)
    check_int("seed", seed, minimum=0)
    if not callable(tokenizer) or not hasattr(tokenizer, "eos_token_id"):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    source = zoo.corpus(world_seed)

    def stream(docs):
        return [i for d in docs for i in tokenizer(d.text)["input_ids"] + [tokenizer.eos_token_id]]

    valid_ids = [tokenizer(d.text)["input_ids"] + [tokenizer.eos_token_id] for d in source.valid_docs]

    def held_out(indices):
        """The held-out documents ``indices`` as one stream of windows, and for each window the document
        holding most of its tokens (ties: the earlier)."""
        windows = stream_windows([t for i in indices for t in valid_ids[i]], context)[0]
        owner = torch.tensor([i for i in indices for _ in valid_ids[i]])[: windows.numel()].view_as(windows)
        return windows, torch.tensor([int(torch.bincount(row).argmax()) for row in owner])

    docs = stream_windows(stream(source.train_docs), context)
    bios = pack_sequences([tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in source.world.training_texts()],
                          context, tokenizer.pad_token_id)
    train_texts = [d.text for d in source.train_docs]
    overlap = tuple(data.overlap_with(train_texts, d.text) for d in source.valid_docs)
    valid, valid_doc = held_out(range(len(source.valid_docs)))
    valid_clean, valid_clean_doc = held_out([i for i, share in enumerate(overlap) if share < CLEAN_BELOW])
    return LMSplits(docs=docs, bios=bios, calib=_draw_windows(docs[0], calib_windows, seed), valid=valid,
                    valid_clean=valid_clean, overlap=overlap, valid_doc=valid_doc, valid_clean_doc=valid_clean_doc)


def _draw_windows(windows: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return windows[order[:n]]


def calibration_draw(splits: LMSplits, seed: int, windows: int | None = None) -> torch.Tensor:
    """Another calibration set: ``windows`` (default: as many as ``splits.calib``) training documentation
    windows drawn with ``seed``, exactly as :func:`lm_splits` draws ``calib`` (the same seed gives the same
    windows). Repeating a PTQ over several draws measures how much its result depends on the draw."""
    if not isinstance(splits, LMSplits):
        raise TypeError(f"splits must be an LMSplits (from lm_splits), got {type(splits).__name__}")
    seed = check_int("seed", seed, minimum=0)
    n = len(splits.calib) if windows is None else check_int("windows", windows, minimum=1,
                                                           maximum=len(splits.docs[0]))
    return _draw_windows(splits.docs[0], n, seed)


def finetune(model: nn.Module, splits: LMSplits, steps: int = 60, batch_size: int = 16, lr: float = 1e-3,
             seed: int = 0) -> list[float]:
    """The one fine-tuning procedure of the chapter, for a QAT-prepared model (ours or torchao's) and for
    the full-precision control alike: ``steps`` AdamW steps with a cosine schedule on batches of the
    training mixture (half documentation, half biographies), drawn with ``seed``. Same seed, same batches:
    every arm sees the same data and the same number of forward and backward passes."""
    from companion.train import mixed_batches, train_causal_lm

    check_module("model", model)
    if not isinstance(splits, LMSplits):
        raise TypeError(f"splits must be an LMSplits (from lm_splits), got {type(splits).__name__}")
    batch_size = check_int("batch_size", batch_size, minimum=2)
    seed = check_int("seed", seed, minimum=0)
    torch.manual_seed(seed)
    batches = mixed_batches([splits.docs, splits.bios], [batch_size - batch_size // 2, batch_size // 2], seed=seed)
    return train_causal_lm(model, batches, steps=steps, lr=lr)
