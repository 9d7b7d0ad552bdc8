"""Train (or load from the cache) every zoo model before the notebooks run, one timing line each.

    python tools/warm_zoo.py

``make test`` runs this before strict nbval, so a cold cache costs its training time here, measured per
model, and not inside the first notebook cell that happens to need a model (which would also hide which
model is slow). A warm cache makes this a few seconds of loading.
"""

from __future__ import annotations

import importlib
import pkgutil
import time

import companion
from companion import zoo


def main() -> None:
    companion.setup(seed=0, plots=False)
    for info in pkgutil.iter_modules(companion.__path__):  # each chapter registers its own models
        importlib.import_module(f"companion.{info.name}")
    started = time.perf_counter()
    for name in sorted(zoo.available(), key=lambda n: hasattr(zoo.recipe_of(n), "base")):  # bases first
        t0 = time.perf_counter()
        zoo.load(name)
        print(f"zoo: {name:<20} ready in {time.perf_counter() - t0:6.1f} s", flush=True)
    print(f"zoo: all {len(zoo.available())} models ready in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
