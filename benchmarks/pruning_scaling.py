"""How pruning time grows with the layer width (issue 13, item 16a).

At the course model's width (128–384) SparseGPT costs little more than Wanda; the Wanda paper reports
Wanda far faster at 7B scale. Both statements hold, because the costs grow differently with the width
``d`` of a square ``d x d`` layer calibrated on ``N`` tokens:

- magnitude: scores ``|W|`` and a per-row sort, ``O(d^2 log d)``;
- Wanda: the statistic ``||X_j||^2`` (``O(N d)``) plus the same scoring, ``O(d^2 log d)``;
- SparseGPT: the Hessian ``X^T X`` (``O(N d^2)``), its Cholesky inverse (``O(d^3)``) and the
  column-by-column OBS updates (``O(d^3)``).

We time each method on one synthetic layer per width (the statistic's accumulation included, as
:func:`companion.pruning.prune` would do it), take the median of ``--repeats`` runs, fit the log-log
slope over the three largest widths, and extrapolate to LLaMA-7B's width 4096 from the fit — an
extrapolation, printed as one. Run it on an idle machine: ``python benchmarks/pruning_scaling.py``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from companion import pruning
from companion.runtime import setup


def time_method(name: str, weight: torch.Tensor, x: torch.Tensor, repeats: int) -> float:
    """Median seconds to prune ``weight`` at 50% (per row) with method ``name`` from inputs ``x``."""
    method = pruning.METHODS[name]
    per_batch, finish = pruning.STATISTICS[method.statistic] if method.statistic else (None, None)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        statistic = finish(per_batch(x), len(x)) if per_batch else None
        method.prune_layer(weight, statistic, 0.5, None, "row")
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def slope(widths: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(width)."""
    lx, ly = [math.log(w) for w in widths], [math.log(s) for s in seconds]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="128,256,512,1024,2048")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(setup(seed=0))
    widths = [int(w) for w in args.widths.split(",")]
    generator = torch.Generator().manual_seed(0)
    results = {name: [] for name in pruning.METHODS}
    print(f"{'width':>6} | " + " | ".join(f"{n:>10}" for n in results) + " | SparseGPT / Wanda")
    for d in widths:
        weight = torch.randn(d, d, generator=generator) / math.sqrt(d)
        x = torch.randn(args.tokens, d, generator=generator)
        row = {name: time_method(name, weight, x, args.repeats) for name in results}
        for name, seconds in row.items():
            results[name].append(seconds)
        print(f"{d:>6} | " + " | ".join(f"{row[n]:>9.4f}s" for n in results)
              + f" | {row['sparsegpt'] / row['wanda']:.1f}x")
    top = widths[-3:]
    print(f"log-log slope over widths {top} (expected: ~2 for magnitude/Wanda, ~3 for SparseGPT "
          "once the O(d^3) terms dominate):")
    for name, seconds in results.items():
        fitted = slope(top, seconds[-3:])
        at_7b = seconds[-1] * (4096 / widths[-1]) ** fitted
        print(f"  {name:>10}: slope {fitted:.2f}; extrapolated to d = 4096: {at_7b:.3f} s per layer")


if __name__ == "__main__":
    main()
