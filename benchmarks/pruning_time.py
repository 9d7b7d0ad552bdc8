"""Pruning time per method on the tiny Llama (median of repeated runs).

    python benchmarks/pruning_time.py

Calibration: 128 windows of 128 tokens from the documentation's training split. Each method is timed
with ``runtime.median_seconds`` (a fresh copy of the model per call; the copy is part of the time) and
the pruned model's held-out perplexity is printed. The GPU 2:4 kernels are timed by
``benchmarks/gpu_sparse.py`` (``F.linear`` layout; an earlier GPU part here used ``w @ x`` with
``x`` as ``[in, tokens]``, the slow path, and was removed).
"""

from __future__ import annotations

import copy

import torch


def pruning_times(repeats: int = 3) -> None:
    import companion
    from companion import metrics, pruning, runtime, zoo
    from companion.train import stream_windows

    print(companion.setup(seed=0))
    llama = zoo.load("tiny-llama")
    model, tok = llama.model, llama.tokenizer
    source = zoo.corpus()
    ids = [i for d in source.train_docs for i in tok(d.text)["input_ids"]]
    windows = stream_windows(ids, 128)[0]
    calib = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))[:128]]
    valid = [d.text for d in source.valid_docs]
    print(f"dense perplexity {metrics.perplexity(model, tok, valid):.1f}")
    for pattern in (None, "2:4"):
        for method in pruning.METHODS:
            seconds = runtime.median_seconds(
                lambda: pruning.prune(copy.deepcopy(model), method, 0.5, pattern, calib=calib),
                repeats=repeats, warmup=1)
            pruned = copy.deepcopy(model)
            pruning.prune(pruned, method, 0.5, pattern, calib=calib)
            print(f"{method:>14} {pattern or '50%':>4}: median {seconds:6.2f} s of {repeats}, "
                  f"perplexity {metrics.perplexity(pruned, tok, valid):.1f}")


if __name__ == "__main__":
    pruning_times()
