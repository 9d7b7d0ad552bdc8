"""Shadow-model training on the digits: vectorised (torch.func.vmap) versus one model at a time.

    python benchmarks/shadow_training.py [K_for_the_big_run]

Prints the wall time of K=8 models both ways (same seeds, same minibatches, same result), then the
time of K models (default 64) trained vectorised, for a small MLP and for chapter 01's own recipe
(the digits-mlp zoo recipe): the chapter 01 budget is 64 models in <= 60 s on 2 CPU cores.
"""

from __future__ import annotations

import sys
import time

from torch import nn


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def main(big_k: int) -> None:
    import companion
    from companion import data, mia

    print(companion.setup(seed=0))
    x, y = data.load_digits_tensors()
    settings = dict(epochs=20, batch_size=128, lr=3e-3, seed=0)
    keep = mia.balanced_keep(8, len(x), seed=0)
    seconds = {}
    for vectorized in (True, False):
        start = time.perf_counter()
        mia.train_shadow_models(make_model, x, y, keep, vectorized=vectorized, **settings)
        seconds[vectorized] = time.perf_counter() - start
    print(f"K=8: vectorised {seconds[True]:.1f} s, looped {seconds[False]:.1f} s, "
          f"speed-up {seconds[False] / seconds[True]:.1f}x")
    start = time.perf_counter()
    mia.train_shadow_models(make_model, x, y, mia.balanced_keep(big_k, len(x), seed=0), **settings)
    print(f"K={big_k}: vectorised {time.perf_counter() - start:.1f} s "
          f"({settings['epochs']} epochs, batch {settings['batch_size']}, MLP 64-64-10)")
    # chapter 01's shadow models: the digits-mlp recipe itself (MLP 64-256-10)
    from companion import zoo

    recipe = zoo.RECIPES["digits-mlp"]
    start = time.perf_counter()
    mia.train_shadow_models(lambda: zoo.build_classifier(recipe), x, y, mia.balanced_keep(big_k, len(x), seed=1),
                            epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr, seed=1)
    print(f"K={big_k}: vectorised {time.perf_counter() - start:.1f} s with chapter 01's recipe "
          f"(digits-mlp: MLP 64-{recipe.hidden}-10, {recipe.epochs} epochs, batch {recipe.batch_size})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64)
