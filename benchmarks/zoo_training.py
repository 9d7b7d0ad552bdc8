"""Time every zoo recipe from a cold cache (the budget: each model trains in at most 3 minutes).

    python benchmarks/zoo_training.py

Trains into a temporary cache, so the reader's cache is untouched. Prints one line per model.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import tempfile
import time


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["COMPANION_CACHE"] = cache
        import companion
        from companion import zoo

        print(companion.setup(seed=0))
        started = time.perf_counter()
        zoo.corpus()
        zoo.course_tokenizer()
        print(f"{'corpus + tokenizer':>20}: {time.perf_counter() - started:6.1f} s")
        for info in pkgutil.iter_modules(companion.__path__):  # chapters register their own models
            importlib.import_module(f"companion.{info.name}")
        for name in sorted(zoo.available(), key=lambda n: hasattr(zoo.recipe_of(n), "base")):  # bases first
            started = time.perf_counter()
            card = zoo.load(name).card
            print(f"{name:>20}: {time.perf_counter() - started:6.1f} s total, {card['train_seconds']:6.1f} s training, "
                  f"{card['parameters']:,} parameters", flush=True)


if __name__ == "__main__":
    main()
