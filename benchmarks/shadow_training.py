"""Shadow-model training on the digits: the stacked trainer's vectorised path (torch.func.vmap) versus
its reference loop (one model at a time), at chapter 01's own recipe and K.

    python benchmarks/shadow_training.py [--ks 8,64] [--epochs 120] [--profile]

Chapter 01 trains K = 64 shadow models of the ``digits-mlp`` recipe (MLP 64-256-10, Adam lr 1e-3,
batch 64, 120 epochs over the mean shadow-set size of 898 digits: 1,683 steps). For each K this prints
the wall time of both paths (same seeds, same minibatches, logits equal to float tolerance), the
speed-up, and the time of the minibatch schedule alone (``train.sampled_minibatches``: one
``torch.multinomial`` per step, shared by both paths, so it bounds the speed-up from above).
``--profile`` adds a ``torch.profiler`` table of the vectorised path (K = the largest, 4 epochs).
Run with the reference thread count (``COMPANION_THREADS``, default 2) on an otherwise idle machine;
the load average is printed with the times.
"""

from __future__ import annotations

import argparse
import os
import time


def main(ks: list[int], epochs: int, profile: bool) -> None:
    import torch

    import companion
    from companion import data, mia, train, zoo

    print(companion.setup(seed=0))
    print("load average (1, 5, 15 min) at start: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    x, y = data.load_digits_tensors()
    recipe = zoo.recipe_of("digits-mlp")

    def make_model():
        return zoo.build_classifier(recipe)

    settings = dict(epochs=epochs, batch_size=recipe.batch_size, lr=recipe.lr, seed=1)
    print(f"recipe: digits-mlp (MLP 64-{recipe.hidden}-10), {epochs} epochs, batch {recipe.batch_size}, "
          f"lr {recipe.lr}, all {len(x)} digits, each model on a random half")
    for k in ks:
        keep = mia.balanced_keep(k, len(x), seed=1)
        steps = epochs * int(keep.sum(1).float().mean().item()) // recipe.batch_size
        start = time.perf_counter()
        train.sampled_minibatches(keep, recipe.batch_size, steps, seed=2)
        schedule = time.perf_counter() - start
        seconds, logits = {}, {}
        for vectorized in (True, False):
            start = time.perf_counter()
            logits[vectorized] = mia.train_shadow_models(make_model, x, y, keep, vectorized=vectorized,
                                                         **settings).logits
            seconds[vectorized] = time.perf_counter() - start
        gap = float((logits[True] - logits[False]).abs().max())
        print(f"K={k} ({steps} steps): vectorised {seconds[True]:.1f} s, loop {seconds[False]:.1f} s, "
              f"speed-up {seconds[False] / seconds[True]:.1f}x; the schedule alone {schedule:.1f} s "
              f"(without it: {(seconds[False] - schedule) / (seconds[True] - schedule):.1f}x); "
              f"max |logit difference| {gap:.1e}", flush=True)
    print("load average (1, 5, 15 min) at end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))

    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        k = max(ks)
        keep = mia.balanced_keep(k, len(x), seed=1)
        with profiler(activities=[ProfilerActivity.CPU]) as prof:
            mia.train_shadow_models(make_model, x, y, keep, **(settings | {"epochs": 4}))
        print(f"torch.profiler, vectorised path, K={k}, 4 epochs:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", default="8,64", help="comma-separated numbers of models (default 8,64)")
    parser.add_argument("--epochs", type=int, default=120, help="epochs (default 120, chapter 01's)")
    parser.add_argument("--profile", action="store_true", help="also profile the vectorised path")
    options = parser.parse_args()
    main([int(k) for k in options.ks.split(",")], options.epochs, options.profile)
