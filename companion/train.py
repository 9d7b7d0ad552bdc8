"""Small, generic training loops: a causal LM on a mixture of text pools, and a classifier.

Both loops are deterministic for a fixed seed, thread count and machine (``companion.setup`` fixes the
last two), and return their loss curve so a notebook can plot it without retraining.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from companion.checks import (check_bool, check_classifier_data, check_float, check_int, check_module,
                              check_positive_float, check_tensor, eager)


# ---------------------------------------------------------------------------------------------
# Turning token lists into fixed-length training windows
# ---------------------------------------------------------------------------------------------


def _check_token_list(name: str, ids) -> None:
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"{name} must be a list of token ids (ints), got {type(ids).__name__}")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"{name} must hold token ids (ints >= 0), got {i!r}")


def stream_windows(token_ids: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut one long token stream into non-overlapping windows of ``length`` (the tail is dropped).

    Returns ``(input_ids, attention_mask)``, both ``[n_windows, length]``. Used for running text
    (documentation) where a window may start mid-sentence, as in GPT pretraining.
    """
    length = check_int("length", length, minimum=1)
    _check_token_list("token_ids", token_ids)
    if len(token_ids) < length:
        raise ValueError(f"token_ids must hold at least length={length} tokens, got {len(token_ids)}")
    n = len(token_ids) // length
    ids = torch.tensor(list(token_ids[: n * length]), dtype=torch.long).view(n, length)
    return ids, torch.ones_like(ids)


def pack_sequences(sequences: Sequence[Sequence[int]], length: int, pad_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedily pack whole short sequences (biographies) into windows of ``length``, padding the rest.

    A sequence never straddles two windows, so each biography is always seen whole and from its
    first token, as it is when we score it later. Sequences longer than ``length`` are an error.
    """
    length = check_int("length", length, minimum=1)
    pad_id = check_int("pad_id", pad_id, minimum=0)
    if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Sequence):
        raise TypeError(f"sequences must be a list of token-id lists, got {type(sequences).__name__}")
    if not sequences:
        raise ValueError("sequences must not be empty")
    for i, seq in enumerate(sequences):
        _check_token_list(f"sequences[{i}]", seq)
    windows, current = [], []
    for seq in sequences:
        if len(seq) > length:
            raise ValueError(f"a sequence has {len(seq)} tokens, more than length={length}")
        if len(current) + len(seq) > length:
            windows.append(current)
            current = []
        current = current + list(seq)
    windows.append(current)
    ids = torch.full((len(windows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), length), dtype=torch.long)
    for row, window in enumerate(windows):
        ids[row, : len(window)] = torch.tensor(window, dtype=torch.long)
        mask[row, : len(window)] = 1
    return ids, mask


def _check_mixed_batches(pools, per_batch, seed) -> None:
    """``mixed_batches``' arguments: non-empty pools of ``(input_ids, attention_mask)`` windows (an
    empty pool could never fill its share of a batch), one positive count per pool, a seed."""
    if not isinstance(pools, Sequence) or not isinstance(per_batch, Sequence) or len(pools) != len(per_batch) \
            or not pools:
        raise ValueError(f"pools and per_batch must be sequences of the same non-zero length, got "
                         f"{len(pools) if isinstance(pools, Sequence) else type(pools).__name__} and "
                         f"{len(per_batch) if isinstance(per_batch, Sequence) else type(per_batch).__name__}")
    for i, (pool, count) in enumerate(zip(pools, per_batch)):
        if not isinstance(pool, (tuple, list)) or len(pool) != 2:
            raise TypeError(f"pools[{i}] must be an (input_ids, attention_mask) pair, got {type(pool).__name__}")
        ids, mask = pool
        check_tensor(f"pools[{i}] input_ids", ids, ndim=2, kind="int")
        check_tensor(f"pools[{i}] attention_mask", mask, ndim=2)
        if ids.shape != mask.shape:
            raise ValueError(f"pools[{i}]: input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} "
                             "must have the same shape")
        if len(ids) == 0:
            raise ValueError(f"pools[{i}] must hold at least one window, got none")
        check_int(f"per_batch[{i}]", count, minimum=1)
    check_int("seed", seed, minimum=0)


@eager(_check_mixed_batches)
def mixed_batches(pools: Sequence[tuple[torch.Tensor, torch.Tensor]], per_batch: Sequence[int],
                  seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of batches taking ``per_batch[i]`` windows from ``pools[i]``.

    Each pool is walked in a fresh seeded permutation per pass (epoch), so every window is seen
    equally often. Labels are the inputs with padding set to -100 (ignored by the loss).
    """
    generator = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(len(ids), generator=generator) for ids, _ in pools]
    cursors = [0] * len(pools)
    while True:
        ids_parts, mask_parts = [], []
        for p, ((ids, mask), count) in enumerate(zip(pools, per_batch)):
            take, taken = [], 0
            while taken < count:
                if cursors[p] == len(orders[p]):
                    orders[p] = torch.randperm(len(ids), generator=generator)
                    cursors[p] = 0
                step = min(count - taken, len(orders[p]) - cursors[p])
                take.append(orders[p][cursors[p]: cursors[p] + step])
                cursors[p] += step
                taken += step
            index = torch.cat(take)
            ids_parts.append(ids[index])
            mask_parts.append(mask[index])
        input_ids, attention_mask = torch.cat(ids_parts), torch.cat(mask_parts)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------------------------------------
# Loops
# ---------------------------------------------------------------------------------------------


def cosine_schedule(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` (the learning-rate multiplier)."""
    check_int("step", step, minimum=0)
    check_int("total", total, minimum=1)
    check_int("warmup", warmup, minimum=0)
    check_float("min_ratio", min_ratio, 0, 1)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train_causal_lm(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]], steps: int,
                    lr: float = 3e-3, weight_decay: float = 0.1, warmup_fraction: float = 0.05,
                    min_lr_ratio: float = 0.1, clip_norm: float = 1.0, progress: bool = False) -> list[float]:
    """Train any Hugging Face causal LM with AdamW and a cosine schedule; return the per-step losses.

    ``batches`` yields dicts with ``input_ids``, ``attention_mask`` and ``labels`` (e.g.
    :func:`mixed_batches`). The model is left in eval mode.
    """
    check_module("model", model)
    if not isinstance(batches, Iterator):
        raise TypeError(f"batches must be an iterator of batch dicts (e.g. mixed_batches(...)), "
                        f"got {type(batches).__name__}")
    steps = check_int("steps", steps, minimum=1)
    lr = check_positive_float("lr", lr)
    check_float("weight_decay", weight_decay, 0)
    check_float("warmup_fraction", warmup_fraction, 0, 1, open_maximum=True)
    check_float("min_lr_ratio", min_lr_ratio, 0, 1)
    check_float("clip_norm", clip_norm, 0, open_minimum=True, allow_inf=True)
    check_bool("progress", progress)
    from tqdm.auto import tqdm

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )
    warmup = max(1, int(warmup_fraction * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_schedule(s, steps, warmup, min_lr_ratio)
    )
    model.train()
    losses = []
    for _ in tqdm(range(steps), disable=not progress, desc="train LM"):
        try:
            batch = next(batches)
        except StopIteration:
            raise ValueError(f"batches ran out after {len(losses)} of steps={steps} batches; pass an endless "
                             "iterator such as mixed_batches(...)") from None
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return losses


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 100,
                     batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                     progress: bool = False) -> list[float]:
    """Train a classifier with cross-entropy and Adam; return the mean loss of each epoch."""
    check_classifier_data(model, x, y)
    epochs = check_int("epochs", epochs, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    lr = check_positive_float("lr", lr)
    check_float("weight_decay", weight_decay, 0)
    seed = check_int("seed", seed, minimum=0)
    check_bool("progress", progress)
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    history = []
    for _ in tqdm(range(epochs), disable=not progress, desc="train classifier"):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            index = order[start: start + batch_size]
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        history.append(total / len(x))
    model.eval()
    return history
