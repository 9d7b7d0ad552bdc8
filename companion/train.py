"""Small, generic training loops: a causal LM on a mixture of text pools, and a classifier.

Both loops are deterministic for a fixed seed, thread count and machine (``companion.setup`` fixes the
last two), and return their loss curve so a notebook can plot it without retraining.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from companion.checks import (check_bool, check_classifier_data, check_float, check_int, check_module,
                              check_positive_float, check_str, check_tensor, eager)


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


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right", width: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists of different lengths into ``(input_ids, attention_mask)`` of ``[B, width]``.

    ``width`` defaults to the longest sequence. ``side="right"`` pads after the tokens (for scoring and
    training: causal attention never looks right, so padding cannot change a real token's prediction);
    ``side="left"`` pads before them (for generation, which appends on the right). The mask is 1 on real
    tokens. Labels are padded the same way with ``pad_id=-100`` (the loss ignores -100).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise TypeError(f"pad_id must be an int, got {type(pad_id).__name__}")
    if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Sequence) or not sequences:
        raise TypeError(f"sequences must be a non-empty list of token-id lists, got {sequences!r:.80}")
    for i, seq in enumerate(sequences):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, (Sequence, torch.Tensor)):
            raise TypeError(f"sequences[{i}] must be a list of token ids, got {type(seq).__name__}")
    longest = max(len(seq) for seq in sequences)
    width = longest if width is None else check_int("width", width, minimum=longest)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, span] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


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

    A sequence never straddles two windows, so each biography is always seen whole and from its own
    first token (``<|bos|>``); but there is no attention mask between the sequences of a window, so a
    biography packed after others is learned after that fixed neighbour, unlike when it is scored
    alone later (chapter 00 measures what this does to the membership signal). Sequences longer than
    ``length`` are an error.
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
    return pad_batch(windows, pad_id, width=length)


def _is_window_pool(pool) -> bool:
    return isinstance(pool, (tuple, list)) and len(pool) == 2 and all(isinstance(t, torch.Tensor) for t in pool)


def _check_window_pool(i: int, pool) -> None:
    ids, mask = pool
    check_tensor(f"pools[{i}] input_ids", ids, ndim=2, kind="int")
    check_tensor(f"pools[{i}] attention_mask", mask, ndim=2)
    if ids.shape != mask.shape:
        raise ValueError(f"pools[{i}]: input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} "
                         "must have the same shape")
    if len(ids) == 0:
        raise ValueError(f"pools[{i}] must hold at least one window, got none")


def _check_sequence_pool(i: int, pool) -> None:
    if not isinstance(pool, (tuple, list)) or not pool:
        raise TypeError(f"pools[{i}] must be an (input_ids, attention_mask) pair of tensors or a non-empty list "
                        f"of (input_ids, labels) token lists, got {type(pool).__name__}")
    for j, pair in enumerate(pool):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or len(pair[0]) != len(pair[1]) or not pair[0]:
            raise ValueError(f"pools[{i}][{j}] must be an (input_ids, labels) pair of equal, non-zero length")
        _check_token_list(f"pools[{i}][{j}] input_ids", pair[0])


def _check_mixed_batches(pools, per_batch, seed, pad_id) -> None:
    """``mixed_batches``' arguments: non-empty pools, all of one kind (an empty pool could never fill its
    share of a batch), one positive count per pool, a seed, and a ``pad_id`` for sequence pools."""
    if not isinstance(pools, Sequence) or not isinstance(per_batch, Sequence) or len(pools) != len(per_batch) \
            or not pools:
        raise ValueError(f"pools and per_batch must be sequences of the same non-zero length, got "
                         f"{len(pools) if isinstance(pools, Sequence) else type(pools).__name__} and "
                         f"{len(per_batch) if isinstance(per_batch, Sequence) else type(per_batch).__name__}")
    windows = _is_window_pool(pools[0])
    for i, (pool, count) in enumerate(zip(pools, per_batch)):
        if _is_window_pool(pool) != windows:
            raise TypeError(f"pools[{i}] is not of the same kind as pools[0]: all pools must be (input_ids, "
                            "attention_mask) windows, or all lists of (input_ids, labels) sequences")
        (_check_window_pool if windows else _check_sequence_pool)(i, pool)
        check_int(f"per_batch[{i}]", count, minimum=1)
    check_int("seed", seed, minimum=0)
    if not windows:
        check_int("pad_id", pad_id, minimum=0)


def _seeded_draws(sizes: Sequence[int], per_batch: Sequence[int], seed: int) -> Iterator[list[torch.Tensor]]:
    """Endless per-batch indices: ``per_batch[i]`` of ``range(sizes[i])`` at a time, each pool walked in a
    fresh seeded permutation per pass (epoch), so every item is seen equally often."""
    generator = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(size, generator=generator) for size in sizes]
    cursors = [0] * len(sizes)
    while True:
        draw = []
        for p, (size, count) in enumerate(zip(sizes, per_batch)):
            take, taken = [], 0
            while taken < count:
                if cursors[p] == len(orders[p]):
                    orders[p] = torch.randperm(size, generator=generator)
                    cursors[p] = 0
                step = min(count - taken, len(orders[p]) - cursors[p])
                take.append(orders[p][cursors[p]: cursors[p] + step])
                cursors[p] += step
                taken += step
            draw.append(torch.cat(take))
        yield draw


@eager(_check_mixed_batches)
def mixed_batches(pools: Sequence, per_batch: Sequence[int], seed: int = 0, pad_id: int | None = None
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of batches taking ``per_batch[i]`` items from ``pools[i]`` (see :func:`_seeded_draws`).

    A pool is either fixed-width *windows*, an ``(input_ids, attention_mask)`` pair of ``[n, T]`` tensors
    (pretraining text; labels are the inputs with padding set to -100), or a list of *sequences*,
    ``(input_ids, labels)`` token lists of any length (chat fine-tuning, where labels are -100 outside
    the answer); a batch of sequences is right-padded with ``pad_id`` to its longest member.
    """
    windows = _is_window_pool(pools[0])
    sizes = [len(pool[0]) if windows else len(pool) for pool in pools]
    for draw in _seeded_draws(sizes, per_batch, seed):
        if windows:
            input_ids = torch.cat([ids[index] for (ids, _), index in zip(pools, draw)])
            attention_mask = torch.cat([mask[index] for (_, mask), index in zip(pools, draw)])
            labels = input_ids.masked_fill(attention_mask == 0, -100)
        else:
            chosen = [pool[i] for pool, index in zip(pools, draw) for i in index.tolist()]
            input_ids, attention_mask = pad_batch([ids for ids, _ in chosen], pad_id)
            labels, _ = pad_batch([lab for _, lab in chosen], -100)
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
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    history = shuffled_epochs(lambda index: nn.functional.cross_entropy(model(x[index]), y[index]),
                              optimizer, len(x), epochs, batch_size, seed, progress, "train classifier")
    model.eval()
    return history


def shuffled_epochs(batch_loss, optimizer: torch.optim.Optimizer, n_examples: int, epochs: int,
                    batch_size: int, seed: int, progress: bool = False, desc: str = "train") -> list[float]:
    """The minibatch loop of every small supervised model here: each epoch visits the ``n_examples``
    in a fresh seeded order, in batches of ``batch_size`` indices; ``batch_loss(index)`` returns the
    batch's mean loss. Returns the example-weighted mean loss of each epoch. ``progress`` shows a bar
    over the epochs, labelled ``desc``."""
    if not callable(batch_loss):
        raise TypeError(f"batch_loss must be a callable of a batch's indices, got {type(batch_loss).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    n_examples = check_int("n_examples", n_examples, minimum=1)
    epochs = check_int("epochs", epochs, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    generator = torch.Generator().manual_seed(check_int("seed", seed, minimum=0))
    check_bool("progress", progress)
    check_str("desc", desc)
    from tqdm.auto import tqdm

    history = []
    for _ in tqdm(range(epochs), disable=not progress, desc=desc):
        order = torch.randperm(n_examples, generator=generator)
        total = 0.0
        for start in range(0, n_examples, batch_size):
            index = order[start: start + batch_size]
            loss = batch_loss(index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        history.append(total / n_examples)
    return history


# ---------------------------------------------------------------------------------------------
# K models of one architecture at once: stacked parameters, one Adam, a seeded schedule
# ---------------------------------------------------------------------------------------------


def adam_step(params: dict, grads: dict, state: dict, t: int, lr: float, beta1: float = 0.9,
              beta2: float = 0.999, eps: float = 1e-8) -> None:
    """One Adam step (Kingma & Ba 2015, Algorithm 1) on a dict of tensors, stacked over models or not;
    ``state`` keeps the moment estimates, ``t`` counts steps from 1. Updates ``params`` in place.

    The same update as ``torch.optim.Adam`` (no weight decay, no amsgrad), written on plain tensors so
    that it applies unchanged to K models whose parameters are stacked along a leading dimension.
    """
    for name, value in (("params", params), ("grads", grads), ("state", state)):
        if not isinstance(value, dict):
            raise TypeError(f"{name} must be a dict of tensors, got {type(value).__name__}")
    if set(grads) != set(params):
        raise ValueError(f"grads must have the keys of params, got {sorted(grads)} for {sorted(params)}")
    t = check_int("t", t, minimum=1)
    lr = check_positive_float("lr", lr)
    check_float("beta1", beta1, 0, 1, open_maximum=True)
    check_float("beta2", beta2, 0, 1, open_maximum=True)
    check_positive_float("eps", eps)
    # Every update is in place: with K stacked models each parameter is K times larger, and fresh
    # tensors each step would cost an allocation (and page faults) per operation.
    for name, param in params.items():
        grad = grads[name]
        if name not in state:
            state[name] = (torch.zeros_like(param), torch.zeros_like(param))
        m, v = state[name]
        m.mul_(beta1).add_(grad, alpha=1 - beta1)  # first moment
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # second moment
        denominator = (v / (1 - beta2**t)).sqrt_().add_(eps)  # bias-corrected sqrt(v_hat) + eps
        param.addcdiv_(m, denominator, value=-lr / (1 - beta1**t))  # theta -= lr * m_hat / (...)


def sampled_minibatches(keep: torch.Tensor, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The schedule of ordinary minibatch training for K models: per step, an index ``[K, batch_size]``
    whose row ``k`` holds ``batch_size`` distinct examples drawn uniformly from model ``k``'s own
    training set (``keep[k]``), from ``torch.Generator().manual_seed(seed)``."""
    check_tensor("keep", keep, ndim=2, kind="bool", nonempty=True)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    steps = check_int("steps", steps, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    if (keep.sum(1) < batch_size).any():
        raise ValueError(f"keep: every model needs at least batch_size={batch_size} training examples, "
                         f"got as few as {int(keep.sum(1).min())}")
    generator = torch.Generator().manual_seed(seed)
    return [torch.multinomial(keep.float(), batch_size, generator=generator) for _ in range(steps)]


class GradientTransform:
    """The hook of :func:`train_stacked_models` that turns one model's batch into its update direction
    (the default, without a hook, is the gradient of the batch's mean cross-entropy).

    ``per_example = True``: ``__call__`` receives per-example gradients ``{name: [B, *shape]}``;
    ``False``: the gradient of the weighted sum of the batch's losses ``{name: shape}``. ``weight``
    ``[B]`` is the batch's weights (0 marks padding), ``drawn`` what :meth:`draw` returned for this
    model and step. ``__call__`` runs inside ``torch.func.vmap`` over models, so it must be a pure
    tensor function; randomness is drawn beforehand by :meth:`draw` (outside ``vmap``, every step
    for models ``0 .. K-1`` in order), so the vectorised path and the reference loop see the same
    numbers. DP-SGD's clipping and noise (``companion.dp``) is the example.
    """

    per_example: bool = True

    def draw(self, model: int) -> dict:
        """Model ``model``'s random inputs for one step (a dict of tensors, or of dicts of tensors)."""
        return {}

    def __call__(self, grads: dict, weight: torch.Tensor, drawn: dict) -> dict:
        raise NotImplementedError


def _stack(trees: list):
    """Stack a list of equally shaped dicts of tensors (nested dicts allowed) along a new first dim."""
    if isinstance(trees[0], dict):
        return {key: _stack([tree[key] for tree in trees]) for key in trees[0]}
    return torch.stack(trees)


def _check_schedule(schedule, n_models: int, n_examples: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each step an index ``[K, B]`` (ints in ``[0, N)``) or an ``(index, weight)`` pair, weight ``[K, B]``."""
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise TypeError(f"schedule must be a non-empty list of [K, B] index tensors or (index, weight) pairs, "
                        f"got {type(schedule).__name__ if not isinstance(schedule, (list, tuple)) else 'an empty list'}")
    steps = []
    for t, step in enumerate(schedule):
        index, weight = step if isinstance(step, tuple) else (step, None)
        check_tensor(f"schedule[{t}] index", index, ndim=2, kind="int", nonempty=True)
        if len(index) != n_models:
            raise ValueError(f"schedule[{t}] index must have one row per model ({n_models}), got {len(index)}")
        if int(index.min()) < 0 or int(index.max()) >= n_examples:
            raise ValueError(f"schedule[{t}] index must hold example indices in [0, {n_examples}), got values in "
                             f"[{int(index.min())}, {int(index.max())}]")
        if weight is not None:
            check_tensor(f"schedule[{t}] weight", weight, kind="float", finite=True)
            if weight.shape != index.shape:
                raise ValueError(f"schedule[{t}] weight must have the index's shape {tuple(index.shape)}, "
                                 f"got {tuple(weight.shape)}")
        steps.append((index, weight))
    return steps


def train_stacked_models(make_model, n_models: int, x: torch.Tensor, y: torch.Tensor, schedule, lr: float,
                         seed: int = 0, vectorized: bool = True, transform: GradientTransform | None = None
                         ) -> torch.Tensor:
    """Train ``n_models`` classifiers of ``make_model()``'s architecture with Adam, model ``k`` on the
    minibatches ``x[schedule[t][k]]``, and return their logits on all of ``x``, ``[K, N, C]``.

    This is the engine of shadow models (membership inference), DP-SGD shadow models and any family of
    K models that differ only in their data. Randomness, so that a reference can replay it: the
    initial weights come from ``torch.manual_seed(seed)`` (``make_model()`` K times), the batches from
    ``schedule`` (e.g. :func:`sampled_minibatches`), anything else from ``transform.draw``.

    ``vectorized=True`` trains all K at once: the parameters are stacked
    (``torch.func.stack_module_state``) and ``vmap`` runs K forward/backward passes as one batched
    computation; :func:`adam_step` is applied to the stacked tensors. ``vectorized=False`` runs the
    identical computation model by model (the reference that the tests and the benchmark compare
    against). Each step's update direction is the gradient of the batch's mean cross-entropy, or
    what ``transform`` (a :class:`GradientTransform`) makes of the (per-example) gradients.
    """
    from torch.func import functional_call, grad, stack_module_state, vmap

    if isinstance(make_model, nn.Module) or not callable(make_model):
        raise TypeError(f"make_model must be a function returning a fresh nn.Module, got {type(make_model).__name__}")
    n_models = check_int("n_models", n_models, minimum=1)
    check_tensor("x", x, kind="float", finite=True, nonempty=True)
    steps = _check_schedule(schedule, n_models, len(x))
    lr = check_positive_float("lr", lr)
    seed = check_int("seed", seed, minimum=0)
    check_bool("vectorized", vectorized)
    if transform is not None and not isinstance(transform, GradientTransform):
        raise TypeError(f"transform must be None or a GradientTransform, got {type(transform).__name__}")
    if transform is None and any(weight is not None for _, weight in steps):
        raise ValueError("schedule has (index, weight) steps, but only a transform reads the weights; "
                         "pass index tensors alone or a GradientTransform")
    if transform is not None:  # a hook always gets weights: 1 for every example of an unpadded batch
        steps = [(index, torch.ones(index.shape) if weight is None else weight) for index, weight in steps]

    torch.manual_seed(seed)
    models = [make_model() for _ in range(n_models)]
    check_classifier_data(models[0], x, y)
    base = copy.deepcopy(models[0]).to("meta")  # the architecture; the weights come from functional_call

    def mean_loss(params, buffers, xb, yb):
        return nn.functional.cross_entropy(functional_call(base, (params, buffers), (xb,)), yb)

    def example_loss(params, buffers, xi, yi):  # one example's loss, for per-example gradients
        return nn.functional.cross_entropy(functional_call(base, (params, buffers), (xi[None],)), yi[None])

    def summed_loss(params, buffers, xb, yb, weight):  # the weighted sum of the batch's losses
        losses = nn.functional.cross_entropy(functional_call(base, (params, buffers), (xb,)), yb, reduction="none")
        return (losses * weight).sum()

    def direction(params, buffers, xb, yb, weight=None, drawn=None):
        """One model's update direction from its batch (inside vmap in the vectorised path)."""
        if transform is None:
            return grad(mean_loss)(params, buffers, xb, yb)
        if transform.per_example:
            grads = vmap(grad(example_loss), in_dims=(None, None, 0, 0))(params, buffers, xb, yb)
        else:
            grads = grad(summed_loss)(params, buffers, xb, yb, weight)
        return transform(grads, weight, drawn)

    if vectorized:
        params, buffers = stack_module_state(models)
        params = {k: v.detach() for k, v in params.items()}
        batched_direction = vmap(direction)
        state = {}
        for t, (index, weight) in enumerate(steps, start=1):
            hook_inputs = () if transform is None else (weight, _stack([transform.draw(k) for k in range(n_models)]))
            adam_step(params, batched_direction(params, buffers, x[index], y[index], *hook_inputs), state, t, lr)
        logits = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
    else:
        outputs = []
        for k, model in enumerate(models):  # the reference: one model at a time, the same arithmetic
            params = {n: p.detach() for n, p in model.named_parameters()}
            buffers = dict(model.named_buffers())
            state = {}
            for t, (index, weight) in enumerate(steps, start=1):
                hook_inputs = () if transform is None else (weight[k], transform.draw(k))
                adam_step(params, direction(params, buffers, x[index[k]], y[index[k]], *hook_inputs), state, t, lr)
            outputs.append(functional_call(base, (params, buffers), (x,)))
        logits = torch.stack(outputs)
    return logits.detach()
