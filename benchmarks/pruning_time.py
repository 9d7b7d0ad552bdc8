"""Pruning time per method on the tiny Llama, and 2:4 sparse matmul speed on a CUDA GPU when one exists.

    python benchmarks/pruning_time.py

Calibration: 128 windows of 128 tokens from the documentation's training split. The GPU part compares
a dense fp16 matmul with the same weight converted to PyTorch's semi-structured (2:4) sparse format;
on a machine without a CUDA GPU of compute capability >= 8.0 it says so and skips.
"""

from __future__ import annotations

import copy
import time

import torch


def pruning_times() -> None:
    import companion
    from companion import metrics, pruning, zoo
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
            pruned = copy.deepcopy(model)
            report = pruning.prune(pruned, method, 0.5, pattern, calib=calib)
            print(f"{method:>10} {pattern or '50%':>4}: {report.seconds:6.2f} s, "
                  f"perplexity {metrics.perplexity(pruned, tok, valid):.1f}")


def semi_structured_matmul() -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        print("2:4 matmul: skipped (needs a CUDA GPU of compute capability >= 8.0)")
        return
    from torch.sparse import to_sparse_semi_structured

    from companion.pruning import nm_mask

    for rows, cols, batch in ((4096, 4096, 2048), (8192, 8192, 4096), (11008, 4096, 4096), (4096, 4096, 16)):
        weight = torch.randn(rows, cols, device="cuda", dtype=torch.float16)
        weight = weight * nm_mask(weight.abs(), 2, 4)
        x = torch.randn(cols, batch, device="cuda", dtype=torch.float16)
        sparse = to_sparse_semi_structured(weight)
        timings = {}
        for name, w in (("dense", weight), ("2:4", sparse)):
            for _ in range(10):
                w @ x
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(100):
                w @ x
            torch.cuda.synchronize()
            timings[name] = (time.perf_counter() - start) / 100
        print(f"2:4 matmul {rows}x{cols} @ {cols}x{batch}: dense {timings['dense'] * 1e3:.3f} ms, "
              f"2:4 {timings['2:4'] * 1e3:.3f} ms, speed-up {timings['dense'] / timings['2:4']:.2f}x "
              f"({torch.cuda.get_device_name()})")


if __name__ == "__main__":
    pruning_times()
    semi_structured_matmul()
