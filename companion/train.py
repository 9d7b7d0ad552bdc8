"""Small, generic training loops: a causal LM on a mixture of text pools, and a classifier.

Both loops are deterministic for a fixed seed, thread count and machine (``companion.setup`` fixes the
last two), and return their loss curve so a notebook can plot it without retraining.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from companion.checks import check_int, check_model_and_data, check_positive_float


# ---------------------------------------------------------------------------------------------
# Turning token lists into fixed-length training windows
# ---------------------------------------------------------------------------------------------


def stream_windows(token_ids: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut one long token stream into non-overlapping windows of ``length`` (the tail is dropped).

    Returns ``(input_ids, attention_mask)``, both ``[n_windows, length]``. Used for running text
    (documentation) where a window may start mid-sentence, as in GPT pretraining.
    """
    length = check_int("length", length, minimum=1)
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
    if not sequences:
        raise ValueError("sequences must not be empty")
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


def mixed_batches(pools: Sequence[tuple[torch.Tensor, torch.Tensor]], per_batch: Sequence[int],
                  seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of batches taking ``per_batch[i]`` windows from ``pools[i]``.

    Each pool is walked in a fresh seeded permutation per pass (epoch), so every window is seen
    equally often. Labels are the inputs with padding set to -100 (ignored by the loss).
    """
    if len(pools) != len(per_batch) or not pools:
        raise ValueError(f"pools and per_batch must have the same non-zero length, got {len(pools)} "
                         f"and {len(per_batch)}")
    for count in per_batch:
        check_int("per_batch[i]", count, minimum=1)
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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    steps = check_int("steps", steps, minimum=1)
    lr = check_positive_float("lr", lr)
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
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
        batch = next(batches)
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
    check_model_and_data(model, x, y)
    epochs = check_int("epochs", epochs, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    lr = check_positive_float("lr", lr)
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
