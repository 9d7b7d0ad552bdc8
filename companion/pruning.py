"""Pruning a trained LM without retraining: magnitude, Wanda and SparseGPT, unstructured or N:M.

The three methods differ only in how they score a weight and whether they fix up the survivors:

- **Magnitude**: score ``|W_ij|``; remove the smallest in each output row.
- **Wanda** (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs", Eq. 1):
  ``S_ij = |W_ij| * ||X_j||_2`` where ``||X_j||_2`` is the norm of input feature ``j`` over all
  calibration tokens; compared within each output row ``i``; no weight update.
- **SparseGPT** (Frantar & Alistarh 2023): the layer-wise reconstruction problem
  ``min ||W X - W' X||^2`` solved column by column with Optimal Brain Surgeon updates using the
  inverse Hessian ``H^{-1}``, ``H = 2 X X^T + lambda I``; the mask is chosen per block of 128 columns,
  over all rows of the block together, by ``w^2 / [H^{-1}]_{jj}^2`` (their Eq. 3 and Algorithm 1).
- **A fixed mask, then SparseGPT's update** (``"wanda+obs"``, ``"magnitude+obs"``): the Wanda or
  magnitude mask, chosen once per layer, followed by SparseGPT's OBS weight update with that mask held
  fixed. This is the weight-update ablation of Sun et al. (2023, Sec. 5; ``ablate_wanda_seq`` and
  ``ablate_mag_seq`` in their repository): it separates what SparseGPT's mask brings from what its
  update brings. ``"sparsegpt-diag"`` is a third ablation: SparseGPT with Wanda's saliency (the Hessian's
  diagonal), chosen SparseGPT's way (per block over all rows, on the updated weights), so that against
  ``"sparsegpt"`` only the saliency differs, and against ``"wanda+obs"`` only where and when the mask is
  chosen.

The control for all of them is :func:`random_prune`: the same layers and pattern, a seeded random
mask, no calibration and no update (what the methods buy over chance).

Each method is one entry of :data:`METHODS` (:func:`register_method`): a scoring function, or an
update function that also repairs the survivors, and the calibration statistic it reads; :func:`prune`
is the one driver for all of them.

N:M sparsity (e.g. 2:4: at most 2 non-zeros in every 4 consecutive input weights) is the pattern that
NVIDIA's sparse tensor cores accelerate. Decoder blocks are pruned one after another, each block's
calibration inputs being the outputs of the already pruned blocks before it (as both papers do).

Layers are found generically: every ``nn.Linear`` or GPT-2 ``Conv1D`` inside the model's decoder blocks
(the largest ``nn.ModuleList`` of identical blocks); embeddings and the LM head are left dense.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from companion.checks import (check_choice, check_float, check_int, check_module, check_positive_float, check_tensor,
                              check_token_ids)


# ---------------------------------------------------------------------------------------------
# Finding the layers of any HF causal LM
# ---------------------------------------------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_prunable(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D`` (a linear layer whose weight is stored transposed)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: the longest ``nn.ModuleList`` whose items are all of one
    class and contain linear layers (``model.layers`` in Llama, ``transformer.h`` in GPT-2, ...)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and any(is_prunable(m) for m in module[0].modules()):
                if best is None or len(module) > len(best):
                    best = module
    if best is None:
        raise ValueError("model has no nn.ModuleList of decoder blocks with linear layers")
    return best


def block_layers(block: nn.Module) -> dict[str, nn.Module]:
    """The prunable layers inside one block, by qualified name."""
    check_module("block", block)
    return {name: module for name, module in block.named_modules() if is_prunable(module)}


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out_features, in_features]`` (a transposed view for ``Conv1D``)."""
    if not isinstance(layer, nn.Module) or not is_prunable(layer):
        raise TypeError(f"layer must be an nn.Linear or a GPT-2 Conv1D, got {type(layer).__name__}")
    return layer.weight.t() if _is_conv1d(layer) else layer.weight


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``None`` (unstructured) or ``"N:M"`` with ``0 < N < M``."""
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be None or a str like '2:4', got {type(pattern).__name__}")
    parts = pattern.split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ValueError(f"pattern must have 0 < N < M, got {pattern!r}")
    return n, m


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest-scoring entries in every group of ``m`` consecutive entries of the last
    dimension; returns a bool mask (True = keep) of the same shape."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a tensor, got {type(scores).__name__}")
    n, m = check_int("n", n, minimum=1), check_int("m", m, minimum=2)
    if n >= m:
        raise ValueError(f"n must be < m, got n={n}, m={m}")
    if scores.shape[-1] % m:
        raise ValueError(f"the last dimension ({scores.shape[-1]}) must be divisible by m={m}")
    groups = scores.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.reshape(scores.shape)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured, per output row: remove the ``sparsity`` fraction of lowest scores in each row
    (Wanda's comparison group; also used for magnitude so the two differ only in the score)."""
    check_tensor("scores", scores, kind="float", finite=True, nonempty=True)
    _check_sparsity(sparsity)
    n_remove = int(scores.shape[-1] * sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_remove:
        keep.scatter_(-1, scores.topk(n_remove, dim=-1, largest=False).indices, False)
    return keep


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured, per layer: remove the ``sparsity`` fraction of lowest scores in the whole matrix
    (classic magnitude pruning; rows may lose very different numbers of weights)."""
    check_tensor("scores", scores, kind="float", finite=True, nonempty=True)
    _check_sparsity(sparsity)
    n_remove = int(scores.numel() * sparsity)
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_remove:
        keep[scores.flatten().topk(n_remove, largest=False).indices] = False
    return keep.view_as(scores)


def _check_sparsity(sparsity) -> float:
    return check_float("sparsity", sparsity, 0, 1, open_maximum=True)


def _check_wanda_inputs(weight, input_sq_norm) -> None:
    """A ``[out, in]`` float weight and ``in`` non-negative, finite sums of squares."""
    check_tensor("weight", weight, ndim=2, kind="float")
    check_tensor("input_sq_norm", input_sq_norm, ndim=1, kind="float", finite=True)
    if weight.shape[-1] != input_sq_norm.shape[-1]:
        raise ValueError(f"weight has {weight.shape[-1]} inputs but input_sq_norm has {input_sq_norm.shape[-1]}")
    if bool((input_sq_norm < 0).any()):
        raise ValueError(f"input_sq_norm must be sums of squares (>= 0), got a minimum of {float(input_sq_norm.min())}")


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's score (Sun et al. 2023, Eq. 1): ``|W_ij| * ||X_j||_2`` for a ``[out, in]`` weight,
    given the per-input-feature sum of squares over the calibration tokens."""
    _check_wanda_inputs(weight, input_sq_norm)
    return weight.abs() * input_sq_norm.sqrt().unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# SparseGPT
# ---------------------------------------------------------------------------------------------


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    nm: tuple[int, int] | None = None, blocksize: int = 128, percdamp: float = 0.01,
                    keep: torch.Tensor | None = None, saliency: str = "obs") -> torch.Tensor:
    """SparseGPT on one ``[out, in]`` weight with Hessian ``H = X X^T`` (``[in, in]``); returns the
    pruned and updated weight (Frantar & Alistarh 2023, Algorithm 1).

    Columns are processed left to right in blocks of ``blocksize``. Unstructured, each block's mask
    is chosen over the whole block, all rows together: one threshold on the ``out x blocksize``
    saliencies ``w^2 / [H^-1]_jj^2`` removes the ``sparsity`` fraction of them, so rows may lose
    different numbers of weights (as in the official code). N:M: within each row's groups of M
    columns, the N largest saliencies are kept. Each pruned weight's error is then spread over the
    not-yet-processed columns through the Cholesky factor of ``H^-1`` (the OBS update).

    ``keep``: a bool mask of the weight's shape (True = keep), fixed beforehand. SparseGPT then does
    only its OBS update with this mask (``sparsity`` and ``nm`` choose nothing): the weight-update
    ablation of Sun et al. (2023, Sec. 5; ``fasterprune(mask=...)`` in the Wanda repository).

    ``saliency``: ``"obs"`` (SparseGPT's ``w^2 / [H^-1]_jj^2``, from the Cholesky factor of the damped
    inverse) or ``"diagonal"``: ``w^2 * H_jj`` with the undamped diagonal, i.e. Wanda's score squared
    (``H_jj`` is ``||X_j||^2`` up to one factor), chosen exactly where and how SparseGPT chooses its own
    (per block over all rows, or N:M per row, on the already updated weights), followed by the same
    update. Comparing the two isolates the full Hessian's part of SparseGPT's mask.
    """
    _check_sparsity(sparsity)
    check_choice("saliency", saliency, ("obs", "diagonal"))
    check_tensor("weight", weight, ndim=2, kind="float", finite=True, nonempty=True)
    check_tensor("hessian", hessian, ndim=2, kind="float", finite=True)
    if keep is not None:
        check_tensor("keep", keep, kind="bool")
        if keep.shape != weight.shape:
            raise ValueError(f"keep must have the weight's shape {list(weight.shape)}, got {list(keep.shape)}")
    if nm is not None:
        if not isinstance(nm, tuple) or len(nm) != 2:
            raise TypeError(f"nm must be None or an (N, M) tuple, got {nm!r}")
        parse_pattern(f"{check_int('nm[0]', nm[0], minimum=1)}:{check_int('nm[1]', nm[1], minimum=2)}")
        if weight.shape[1] % nm[1]:
            raise ValueError(f"weight has {weight.shape[1]} inputs, not divisible by M={nm[1]}")
    blocksize = check_int("blocksize", blocksize, minimum=1)
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"blocksize ({blocksize}) must be a multiple of M={nm[1]}")
    percdamp = check_float("percdamp", percdamp, 0)
    W = weight.detach().clone().float()
    columns = W.shape[1]
    H = hessian.detach().clone().float()
    if H.shape != (columns, columns):
        raise ValueError(f"hessian must be [{columns}, {columns}], got {list(H.shape)}")
    dead = torch.diag(H) == 0  # inputs that were always zero: any weight there is free to prune
    H[dead, dead] = 1
    W[:, dead] = 0
    diagonal = torch.diag(H).clone()  # undamped: the "diagonal" saliency's ||X_j||^2 (up to a factor)
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(columns, device=H.device, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        W1 = W[:, start:end].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[start:end, start:end]
        # what the saliency divides w^2 by: [H^-1]_jj^2 (OBS) or 1 / H_jj (the diagonal approximation)
        denominator = torch.diag(Hinv1) ** 2 if saliency == "obs" else 1 / diagonal[start:end]
        if keep is not None:
            prune_mask = ~keep[:, start:end].to(W1.device)
        elif nm is None:
            scores = W1**2 / denominator.reshape(1, -1)
            threshold = torch.sort(scores.flatten())[0][int(scores.numel() * sparsity)] \
                if sparsity > 0 else -1.0
            prune_mask = scores <= threshold if sparsity > 0 else torch.zeros_like(W1, dtype=torch.bool)
        else:
            prune_mask = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(end - start):
            w = W1[:, i]
            d = Hinv1[i, i]
            if keep is None and nm is not None and i % nm[1] == 0:
                group = W1[:, i: i + nm[1]] ** 2 / denominator[i: i + nm[1]].reshape(1, -1)
                prune_mask[:, i: i + nm[1]] = ~nm_mask(group, nm[0], nm[1])
            q = w.clone()
            q[prune_mask[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, start:end] = Q1
        W[:, end:] -= Err1 @ Hinv[start:end, end:]
    return W.to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# The methods: a registry of how each one prunes a layer
# ---------------------------------------------------------------------------------------------


def magnitude_scores(weight: torch.Tensor, statistic=None) -> torch.Tensor:
    """Magnitude pruning's score ``|W_ij|`` (needs no calibration statistic)."""
    check_tensor("weight", weight, ndim=2, kind="float", finite=True)
    return weight.abs()


#: What a method may read about each layer's calibration inputs ``X`` (``[tokens, in]``): a running
#: sum over the calibration batches of ``per_batch(X)``, turned into the statistic by
#: ``finish(total, n_tokens)``. Wanda reads ``sum_t x_tj^2`` (``||X_j||^2``); SparseGPT the Hessian
#: of the layer-wise reconstruction loss, ``H = 2 X^T X / n`` (Frantar & Alistarh 2023, Sec. 3).
STATISTICS = {
    "input_sq_norm": (lambda x: (x**2).sum(0), lambda total, n: total),
    "hessian": (lambda x: x.t() @ x, lambda total, n: 2 * total / n),
}


@dataclass(frozen=True)
class PruningMethod:
    """One pruning method, as :func:`prune` applies it to each ``[out, in]`` weight of a block.

    Either ``score(weight, statistic) -> scores``: the weights with the lowest scores are removed
    (per row, per layer or N:M, by :func:`prune`'s ``pattern`` and ``compare``) and the rest kept
    unchanged; or ``update(weight, statistic, sparsity, nm) -> new weight``: the method chooses the
    mask itself and may change the surviving weights (SparseGPT). ``statistic`` names what it reads
    from the calibration inputs (a key of :data:`STATISTICS`; ``None``: no calibration needed).
    """

    name: str
    score: object = None
    update: object = None
    statistic: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name must be a non-empty str, got {self.name!r}")
        if (self.score is None) == (self.update is None):
            raise TypeError(f"method {self.name!r} needs exactly one of score or update (a function), "
                            f"got {'both' if self.score is not None else 'neither'}")
        for field_name in ("score", "update"):
            value = getattr(self, field_name)
            if value is not None and not callable(value):
                raise TypeError(f"{field_name} must be a function, got {type(value).__name__}")
        if self.statistic is not None:
            check_choice("statistic", self.statistic, tuple(STATISTICS))

    def prune_layer(self, weight: torch.Tensor, statistic, sparsity: float, nm: tuple[int, int] | None,
                    compare: str) -> torch.Tensor:
        """The layer's new weight (same shape): masked by the scores, or the method's update."""
        if self.update is not None:
            return self.update(weight, statistic, sparsity, nm)
        scores = self.score(weight, statistic)
        keep = nm_mask(scores, *nm) if nm else (row_mask if compare == "row" else layer_mask)(scores, sparsity)
        return weight * keep


#: Every method :func:`prune` knows, by name: the chapter's three, then the three weight-update ablations.
METHODS: dict[str, PruningMethod] = {}


def register_method(name: str, score=None, *, update=None, statistic: str | None = None) -> PruningMethod:
    """Add a pruning method: one scoring function (``score(weight, statistic) -> scores``, higher =
    keep) or one update function (``update(weight, statistic, sparsity, nm) -> new weight``), and the
    calibration statistic it reads (``None``, ``"input_sq_norm"`` or ``"hessian"``). Returns it."""
    method = PruningMethod(name, score, update, statistic)
    if name in METHODS:
        raise ValueError(f"name must be a new method name, got {name!r}, which is already registered")
    METHODS[name] = method
    return method


def fixed_mask_then_update(score):
    """An ``update`` for :func:`register_method`: choose the mask with ``score`` (per output row, or
    N:M), once for the whole layer, then run SparseGPT's OBS update with that mask fixed
    (:func:`sparsegpt_prune` with ``keep``). The weight-update ablation of Sun et al. (2023, Sec. 5;
    ``ablate_wanda_seq`` / ``ablate_mag_seq`` in their repository, whose magnitude mask is per layer).

    ``score(weight, statistic)`` receives the diagonal of the Hessian, ``2 ||X_j||^2 / n``: Wanda's
    ``||X_j||^2`` up to one positive factor, so Wanda's ranking is unchanged."""
    if not callable(score):
        raise TypeError(f"score must be a function, got {type(score).__name__}")

    def update(weight, hessian, sparsity, nm):
        check_tensor("hessian", hessian, ndim=2, kind="float", finite=True)
        scores = score(weight, torch.diag(hessian))
        keep = nm_mask(scores, *nm) if nm else row_mask(scores, sparsity)
        return sparsegpt_prune(weight, hessian, sparsity, nm, keep=keep)

    return update


register_method("magnitude", magnitude_scores)
register_method("wanda", wanda_scores, statistic="input_sq_norm")
register_method("sparsegpt", update=sparsegpt_prune, statistic="hessian")
register_method("wanda+obs", update=fixed_mask_then_update(wanda_scores), statistic="hessian")
register_method("magnitude+obs", update=fixed_mask_then_update(magnitude_scores), statistic="hessian")
register_method("sparsegpt-diag", update=lambda weight, hessian, sparsity, nm: sparsegpt_prune(
    weight, hessian, sparsity, nm, saliency="diagonal"), statistic="hessian")


# ---------------------------------------------------------------------------------------------
# The sequential, block-by-block driver
# ---------------------------------------------------------------------------------------------


@dataclass
class PruneReport:
    """What :func:`prune` did: per layer sparsity and the time it took."""

    method: str
    sparsity: float
    pattern: str | None
    nsamples: int
    seconds: float
    layers: dict[str, float] = field(default_factory=dict)  # layer name -> fraction of zeros

    @property
    def overall(self) -> float:
        return sum(self.layers.values()) / max(1, len(self.layers))


class _StopForward(Exception):
    pass


def _check_calib(model, calib) -> None:
    """Calibration token ids ``[nsamples, seq_len]`` that the model's embedding can read."""
    if not isinstance(calib, torch.Tensor) or calib.ndim != 2 or calib.numel() == 0:
        raise ValueError(f"calib must be a non-empty [nsamples, seq_len] tensor of token ids, got "
                         f"{type(calib).__name__ if not isinstance(calib, torch.Tensor) else tuple(calib.shape)}")
    if callable(getattr(model, "get_input_embeddings", None)):
        check_token_ids("calib", calib, model)
    else:
        check_tensor("calib", calib, kind="int")


#: Calibration sequences run through the model together, in batches of this many (equal-length rows:
#: no padding mask is needed, and a causal model's states do not depend on the other rows).
CALIB_BATCH = 32


def _calib_chunks(calib: torch.Tensor) -> list[slice]:
    """The rows of ``calib`` that each forward batch holds."""
    return [slice(start, min(start + CALIB_BATCH, len(calib))) for start in range(0, len(calib), CALIB_BATCH)]


def _block_inputs(model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor):
    """Run the model up to its first block and capture, per batch of calibration sequences
    (:func:`_calib_chunks`), the hidden states and the keyword arguments that the block receives
    (masks, rotary embeddings, ...)."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), args[1:], kwargs))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for rows in _calib_chunks(calib):
            try:
                model(input_ids=calib[rows], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _real_positions(calib: torch.Tensor, pad_token_id) -> torch.Tensor | None:
    """``calib != pad_token_id`` per position (``None`` when every position counts)."""
    if pad_token_id is None:
        return None
    pad_token_id = check_int("pad_token_id", pad_token_id, minimum=0)
    real = calib != pad_token_id
    if not bool(real.any()):
        raise ValueError(f"calib holds only pad_token_id={pad_token_id}: no position to calibrate on")
    if bool((real[:, 1:] & ~real[:, :-1]).any()):  # a real token after a pad: not tail padding
        raise ValueError(f"calib has pad_token_id={pad_token_id} before a real token in a row: only "
                         "padding at the end of a window is supported (no attention mask is passed)")
    return real


def _drop_padding(hidden: torch.Tensor, positions: torch.Tensor | None, rows: slice) -> torch.Tensor:
    """A layer's input for the calibration rows ``rows`` (``[len(rows), seq, features]``) as
    ``[tokens, features]`` floats, without the padded positions."""
    x = hidden.reshape(-1, hidden.shape[-1]).float()
    if positions is None:
        return x
    real = positions[rows].reshape(-1).to(x.device)
    if x.shape[0] != real.shape[0]:
        raise ValueError(f"a layer saw {x.shape[0]} positions for calibration rows {rows.start}-{rows.stop - 1}, "
                         f"expected {real.shape[0]}")
    return x[real]


def _run_block(block: nn.Module, inputs):
    outputs = []
    for hidden, args, kwargs in inputs:
        out = block(hidden, *args, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


@torch.no_grad()
def prune(model: nn.Module, method: str = "wanda", sparsity: float = 0.5, pattern: str | None = None,
          calib: torch.Tensor | None = None, nsamples: int | None = None, compare: str = "row",
          pad_token_id: int | None = None) -> PruneReport:
    """Prune every linear layer in the model's decoder blocks, in place, and report what was done.

    Args:
        model: any HF causal LM (Llama-style ``nn.Linear`` or GPT-2 ``Conv1D`` layers).
        method: a name in :data:`METHODS`: ``"magnitude"``, ``"wanda"``, ``"sparsegpt"``, the ablations
            ``"wanda+obs"`` and ``"magnitude+obs"`` (:func:`fixed_mask_then_update`), or one added with
            :func:`register_method`.
        sparsity: the fraction of weights removed (unstructured); ignored for an N:M pattern,
            whose sparsity is ``1 - N/M``.
        pattern: ``None`` (unstructured) or ``"N:M"``, e.g. ``"2:4"``.
        calib: calibration token ids ``[nsamples, seq_len]`` (Wanda and SparseGPT need them).
        nsamples: use only the first ``nsamples`` rows of ``calib``.
        compare: for unstructured magnitude or Wanda, compare scores within each output ``"row"``
            (Wanda's choice) or across the whole ``"layer"`` (classic magnitude pruning).
        pad_token_id: positions of ``calib`` holding this id are left out of every statistic (Wanda's
            norms, SparseGPT's Hessian and its token count), as an attention mask would leave them out;
            padding at the end of a window (:func:`companion.train.pack_sequences`) does not change the
            causal model's states before it, so this is exact; padding before a real token (left
            padding) is rejected. ``None``: every position counts.
    """
    check_choice("method", method, tuple(METHODS))
    chosen = METHODS[method]
    if compare not in ("row", "layer"):
        raise ValueError(f"compare must be 'row' or 'layer', got {compare!r}")
    nm = parse_pattern(pattern)
    sparsity = 1 - nm[0] / nm[1] if nm else _check_sparsity(sparsity)
    blocks = decoder_blocks(model)
    if chosen.statistic is not None:
        if not isinstance(calib, torch.Tensor) or calib.ndim != 2 or len(calib) == 0:
            raise ValueError(f"method {method!r} needs calib, a [nsamples, seq_len] tensor of token ids, "
                             f"got {type(calib).__name__ if calib is None else tuple(getattr(calib, 'shape', ()))}")
        _check_calib(model, calib)
        if nsamples is not None:
            calib = calib[: check_int("nsamples", nsamples, minimum=1)]
    positions = _real_positions(calib, pad_token_id) if chosen.statistic is not None else None
    chunks = None if chosen.statistic is None else _calib_chunks(calib)
    for name, layer in ((n, l) for block in blocks for n, l in block_layers(block).items()):
        if nm and weight_matrix(layer).shape[1] % nm[1]:
            raise ValueError(f"layer {name} has {weight_matrix(layer).shape[1]} inputs, not divisible by M={nm[1]}")

    started = time.perf_counter()
    was_training = model.training
    model.eval()
    inputs = None if chosen.statistic is None else _block_inputs(model, blocks, calib.to(next(model.parameters()).device))
    report = PruneReport(method=method, sparsity=sparsity, pattern=pattern,
                         nsamples=0 if inputs is None else len(calib), seconds=0.0)
    for index, block in enumerate(blocks):
        layers = block_layers(block)
        totals, tokens = {}, {}
        if inputs is not None:  # one pass through the block: each layer's inputs, summed into its statistic
            per_batch, finish = STATISTICS[chosen.statistic]
            handles, calls = [], {}
            for name, layer in layers.items():
                tokens[name], calls[name] = 0, 0

                def collect(module, args, output, name=name):
                    x = _drop_padding(args[0], positions, chunks[calls[name]])
                    calls[name] += 1
                    value = per_batch(x)
                    totals[name] = value if name not in totals else totals[name] + value
                    tokens[name] += x.shape[0]

                handles.append(layer.register_forward_hook(collect))
            _run_block(block, inputs)
            for handle in handles:
                handle.remove()
        for name, layer in layers.items():
            W = weight_matrix(layer)
            statistic = None if inputs is None else finish(totals[name], tokens[name])
            W.copy_(chosen.prune_layer(W, statistic, sparsity, nm, compare))  # a view for Conv1D: writes the storage
            report.layers[f"block{index}.{name}"] = float((W == 0).float().mean())
        if inputs is not None:
            outputs = _run_block(block, inputs)  # the pruned block feeds the next one
            inputs = [(out, args, kwargs) for out, (_, args, kwargs) in zip(outputs, inputs)]
    model.train(was_training)
    report.seconds = time.perf_counter() - started
    return report


@torch.no_grad()
def random_prune(model: nn.Module, sparsity: float = 0.5, pattern: str | None = None, seed: int = 0) -> PruneReport:
    """The control for every method above: prune the same layers to the same pattern with a random mask.

    Scores are uniform random numbers from one ``torch.Generator`` seeded with ``seed``, drawn layer
    after layer in :func:`prune`'s order (so every layer gets its own mask, and the same seed gives the
    same masks on any machine); they are turned into a mask exactly as a method's scores are: the
    ``sparsity`` fraction removed in each output row (unstructured), or N of every M kept. No
    calibration data, no weight update. In place; returns the same report as :func:`prune`."""
    check_module("model", model)
    nm = parse_pattern(pattern)
    sparsity = 1 - nm[0] / nm[1] if nm else _check_sparsity(sparsity)
    seed = check_int("seed", seed, minimum=0)
    blocks = decoder_blocks(model)
    for name, layer in ((n, l) for block in blocks for n, l in block_layers(block).items()):
        if nm and weight_matrix(layer).shape[1] % nm[1]:
            raise ValueError(f"layer {name} has {weight_matrix(layer).shape[1]} inputs, not divisible by M={nm[1]}")
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    report = PruneReport(method="random", sparsity=sparsity, pattern=pattern, nsamples=0, seconds=0.0)
    for index, block in enumerate(blocks):
        for name, layer in block_layers(block).items():
            W = weight_matrix(layer)
            scores = torch.rand(W.shape, generator=generator).to(W.device)
            W.mul_(nm_mask(scores, *nm) if nm else row_mask(scores, sparsity))  # a view for Conv1D
            report.layers[f"block{index}.{name}"] = float((W == 0).float().mean())
    report.seconds = time.perf_counter() - started
    return report


def sparsity_report(model: nn.Module) -> dict[str, float]:
    """Fraction of exactly-zero weights in each prunable layer of the decoder blocks, plus ``"overall"``."""
    result, zeros, total = {}, 0, 0
    for index, block in enumerate(decoder_blocks(model)):
        for name, layer in block_layers(block).items():
            W = layer.weight
            result[f"block{index}.{name}"] = float((W == 0).float().mean())
            zeros += int((W == 0).sum())
            total += W.numel()
    result["overall"] = zeros / total
    return result


def is_nm_sparse(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs of every row has at most ``n`` non-zeros."""
    check_tensor("weight", weight)
    n, m = check_int("n", n, minimum=0), check_int("m", m, minimum=1)
    if weight.shape[-1] % m:
        return False
    return bool(((weight.reshape(-1, m) != 0).sum(1) <= n).all())


def semi_structured_bytes(out_features: int, in_features: int, bits: int = 16) -> dict[str, int]:
    """Storage of a 2:4 weight: half the values plus 2-bit indices per kept value (NVIDIA's format
    stores, for each group of 4, which 2 positions are kept), versus the dense matrix."""
    check_int("out_features", out_features, minimum=1)
    check_int("in_features", in_features, minimum=4)
    check_int("bits", bits, minimum=1)
    dense = out_features * in_features * bits // 8
    values = dense // 2
    metadata = math.ceil(out_features * in_features // 2 * 2 / 8)
    return {"dense": dense, "values": values, "metadata": metadata, "sparse_total": values + metadata}


def to_semi_structured(model: nn.Module) -> int:
    """Convert every 2:4-sparse ``nn.Linear`` weight in the decoder blocks to PyTorch's semi-structured
    sparse tensor (``torch.sparse.to_sparse_semi_structured``), in place; returns how many were converted.

    Needs a CUDA GPU of compute capability >= 8.0 and half-precision weights; raises ``RuntimeError``
    elsewhere (zeros alone bring no speed on a CPU).
    """
    decoder_blocks(model)  # a clear error for something that is not a decoder model
    if not torch.cuda.is_available():
        raise RuntimeError("to_semi_structured needs a CUDA GPU (compute capability >= 8.0); none is visible. "
                           "On a CPU, 2:4 zeros save nothing: keep the dense (masked) model")
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        raise RuntimeError(f"to_semi_structured needs compute capability >= 8.0, this GPU has {major}.x")
    from torch.sparse import to_sparse_semi_structured

    converted = 0
    for block in decoder_blocks(model):
        for layer in block_layers(block).values():
            if isinstance(layer, nn.Linear) and layer.weight.is_cuda and is_nm_sparse(layer.weight, 2, 4):
                layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
                converted += 1
    return converted


# ---------------------------------------------------------------------------------------------
# Looking inside: input-feature norms, and a constructed outlier model
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def input_feature_norms(model: nn.Module, calib: torch.Tensor, pad_token_id: int | None = None
                        ) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` over all calibration tokens for every input feature of every prunable layer in the
    decoder blocks (of the model as it is, without pruning): Wanda's activation factor. Positions holding
    ``pad_token_id`` are left out, as in :func:`prune`."""
    decoder_blocks(model)  # a clear error for something that is not a decoder model
    _check_calib(model, calib)
    positions = _real_positions(calib, pad_token_id)
    current = [0]
    sums, handles = {}, []
    for index, block in enumerate(decoder_blocks(model)):
        for name, layer in block_layers(block).items():
            key = f"block{index}.{name}"

            def collect(module, args, output, key=key):
                x = _drop_padding(args[0], positions, current[0])  # current[0]: the rows in this batch
                sums[key] = sums.get(key, 0) + (x**2).sum(0)

            handles.append(layer.register_forward_hook(collect))
    was_training = model.training
    model.eval()  # as in prune: no dropout in the statistics
    try:
        with torch.no_grad():
            for rows in _calib_chunks(calib):
                current[0] = rows
                model(input_ids=calib[rows])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {key: value.sqrt() for key, value in sums.items()}


def _check_outlier_args(model, channels, alpha, which) -> None:
    """``channels`` in ``[1, hidden size]``, a finite ``alpha > 0`` (NaN would be written into the weights)
    and ``which`` one of ``"most"`` / ``"least"``."""
    check_choice("which", which, ("most", "least"))
    check_positive_float("alpha", alpha)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    check_int("channels", channels, minimum=1, maximum=hidden if isinstance(hidden, int) else None)


@torch.no_grad()
def plant_outlier_channels(model: nn.Module, channels: int = 8, alpha: float = 20.0,
                           which: str = "most") -> list[list[int]]:
    """A constructed, function-preserving change that gives a Llama-style model LLM-like outlier features.

    In every decoder block, for each RMSNorm (``input_layernorm``, ``post_attention_layernorm``) we take
    the ``channels`` most important hidden channels, importance being ``|g_c| * sum ||W[:, c]||`` over
    the linear layers that read the norm's output (q/k/v, or gate/up), multiply the norm's weight ``g_c``
    by ``alpha`` and divide those input columns by ``alpha``. The model computes exactly the same
    function, but the chosen input features are now ``alpha`` times larger and their weights ``alpha``
    times smaller: the signature of the outlier features of large LLMs (Dettmers et al. 2022). Magnitude
    pruning then removes the shrunken, important weights; Wanda's ``|W| * ||X||`` does not change.
    ``which="least"`` plants on the ``channels`` least important channels instead (a control: the same
    rescaling where it should matter little). Returns the chosen channels per norm. Needs Llama's
    module names.
    """
    _check_outlier_args(model, channels, alpha, which)
    readers = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
    chosen = []
    for block in decoder_blocks(model):
        for norm_name, linear_names in readers.items():
            norm = getattr(block, norm_name, None)
            if norm is None or not hasattr(norm, "weight"):
                raise ValueError("plant_outlier_channels needs Llama-style blocks (input_layernorm, "
                                 f"post_attention_layernorm, q/k/v/gate/up projections); got {type(block).__name__}")
            linears = [block.get_submodule(name) for name in linear_names]
            importance = norm.weight.abs() * sum(layer.weight.norm(dim=0) for layer in linears)
            picked = importance.topk(channels, largest=which == "most").indices
            norm.weight[picked] *= alpha
            for layer in linears:
                layer.weight[:, picked] /= alpha
            chosen.append(sorted(picked.tolist()))
    return chosen
