"""Chapter 01: choosing the early-stopped recipe's epoch count on the member half only, never on the
test half that table 1.11 evaluates (not part of make test; 5 folds x 16 small trainings, about a
minute on 2 cores).

    python benchmarks/early_stop_selection.py   # writes benchmarks/recorded/early_stop_selection.json

The rule: split the 898 training digits of ``data.digits_splits(seed=0)`` into
5 folds (a seeded permutation); on each fold, train with Opacus (``dp.train_dp_classifier``, seed 0, the
same initial weights) on the other four folds (a) DP-SGD at epsilon = 4, calibrated to the fold's size,
and (b) the non-private recipe for every epoch count 1..15; score each on the held-out fold. The chosen
epoch count is the one whose mean held-out accuracy is closest to DP-SGD's at epsilon = 4 (ties: the
fewer epochs). epsilon = 4 is the reference because it is the budget chapter 01's discussion of
DP's guarantee centres on. The test half never enters. The record also keeps each fold's paired
difference (chosen minus reference) with its t-interval, the epoch count with the best held-out
accuracy, the recipes (so a stale record is caught) and the run time. Chapter 01 reads the JSON and
asserts that ``dp.SETTINGS`` uses the chosen count and the recorded recipes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

import companion
from companion import data, dp, zoo

RECORD = Path(__file__).resolve().parent / "recorded" / "early_stop_selection.json"
N_FOLDS = 5
EPOCHS = tuple(range(1, 16))
REFERENCE = "dp eps=4"


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())


def _train(config: dp.DPConfig, x, y) -> torch.nn.Module:
    torch.manual_seed(0)
    model = zoo.build_classifier(zoo.recipe_of("digits-mlp"))
    return dp.train_dp_classifier(model, x, y, config, seed=0)[0]


def main() -> None:
    print(companion.setup(seed=0))
    started = time.perf_counter()
    settings = {s.name: s for s in dp.SETTINGS}
    non_private = settings["non-private"].config
    splits = data.digits_splits(seed=0)
    x, y = splits.x_train, splits.y_train
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    folds = torch.tensor_split(order, N_FOLDS)
    reference, by_epochs = [], {e: [] for e in EPOCHS}
    for k, held in enumerate(folds):
        rest = torch.cat([f for j, f in enumerate(folds) if j != k])
        xt, yt, xv, yv = x[rest], y[rest], x[held], y[held]
        dp_config = settings[REFERENCE].resolve(len(rest))
        reference.append(_accuracy(_train(dp_config, xt, yt), xv, yv))
        for e in EPOCHS:
            model = _train(dataclasses.replace(non_private, epochs=e), xt, yt)
            by_epochs[e].append(_accuracy(model, xv, yv))
        print(f"fold {k}: {REFERENCE} {reference[-1]:.3f}; "
              + " ".join(f"{e}:{by_epochs[e][-1]:.3f}" for e in EPOCHS), flush=True)
    target = float(np.mean(reference))
    gaps = {e: abs(float(np.mean(a)) - target) for e, a in by_epochs.items()}
    chosen = min(EPOCHS, key=lambda e: (gaps[e], e))
    best = max(EPOCHS, key=lambda e: (float(np.mean(by_epochs[e])), -e))
    paired = np.array(by_epochs[chosen]) - np.array(reference)
    half = stats.t.ppf(0.975, N_FOLDS - 1) * paired.std(ddof=1) / np.sqrt(N_FOLDS)
    record = {"n_folds": N_FOLDS, "n_train_digits": len(x), "reference": REFERENCE,
              "reference_accuracy": target, "reference_folds": reference,
              "accuracy_by_epochs": {str(e): float(np.mean(a)) for e, a in by_epochs.items()},
              "folds_by_epochs": {str(e): a for e, a in by_epochs.items()}, "chosen_epochs": chosen,
              "chosen_minus_reference": {"folds": paired.tolist(), "mean": float(paired.mean()),
                                         "t_interval": [float(paired.mean() - half), float(paired.mean() + half)]},
              "best_epochs": best,
              "recipes": {"non-private": dataclasses.asdict(non_private),
                          REFERENCE: {**dataclasses.asdict(settings[REFERENCE].config),
                                      "target_epsilon": settings[REFERENCE].target_epsilon}},
              "seconds": round(time.perf_counter() - started, 1)}
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{REFERENCE}: mean held-out accuracy {target:.3f}; chosen epochs {chosen} "
          f"({float(np.mean(by_epochs[chosen])):.3f}; paired {paired.mean():+.3f}, t-interval "
          f"{paired.mean() - half:+.3f} to {paired.mean() + half:+.3f}); best epochs {best}; "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
