"""DP-SGD on the digits: Opacus on one model versus the vectorised path (torch.func) on K models.

    python benchmarks/dp_training.py [K_for_the_big_run] [--curve]

Prints the wall time of: one target trained with Opacus (the chapter's DP recipe at epsilon = 4);
K=4 DP shadow models trained vectorised and one model at a time (same seeds, same result); K models
(default 32) vectorised, with DP (per-example gradients) and without (no clipping, no noise).
``--curve`` also times every point of the chapter 01 privacy-utility curve (``dp.SETTINGS``); the
chapter's budget for the whole curve is about 90 s on 2 CPU cores.
"""

from __future__ import annotations

import sys
import time


def main(big_k: int, curve: bool) -> None:
    import dataclasses
    import math

    import torch

    import companion
    from companion import data, dp, mia, zoo

    print(companion.setup(seed=0))
    setting = next(s for s in dp.SETTINGS if s.target_epsilon == 4.0)
    splits = data.digits_splits(seed=0)
    x, y = data.load_digits_tensors()

    def make_model():
        return zoo.build_classifier(zoo.recipe_of("digits-mlp"))

    config = setting.resolve(len(splits.x_train))
    q, steps = config.schedule(len(splits.x_train))
    print(f"recipe: MLP 64-256-10, Adam lr {config.lr}, {config.epochs} epochs, q = {q:.4f}, {steps} steps, "
          f"C = {config.max_grad_norm}, sigma = {config.noise_multiplier:.3f} (epsilon 4, delta {config.delta:g}, "
          f"{config.accountant.upper()})")

    torch.manual_seed(0)
    start = time.perf_counter()
    model, report = dp.train_dp_classifier(make_model(), splits.x_train, splits.y_train, config)
    accuracy = (model(splits.x_test).argmax(1) == splits.y_test).float().mean().item()
    print(f"Opacus, 1 model: {time.perf_counter() - start:.1f} s, test accuracy {accuracy:.3f}, "
          f"epsilon {report.epsilon:.2f}")

    seconds = {}
    for vectorized in (True, False):
        start = time.perf_counter()
        dp.train_private_shadow_models(make_model, x, y, mia.balanced_keep(4, len(x)), config, vectorized=vectorized)
        seconds[vectorized] = time.perf_counter() - start
    print(f"K=4 with DP: vectorised {seconds[True]:.1f} s, looped {seconds[False]:.1f} s, "
          f"speed-up {seconds[False] / seconds[True]:.1f}x")
    keep = mia.balanced_keep(big_k, len(x))
    plain = dataclasses.replace(config, noise_multiplier=0.0, max_grad_norm=math.inf)
    for name, run_config in (("with DP", config), ("without DP", plain)):
        start = time.perf_counter()
        dp.train_private_shadow_models(make_model, x, y, keep, run_config)
        elapsed = time.perf_counter() - start
        print(f"K={big_k} {name}: vectorised {elapsed:.1f} s ({elapsed / big_k:.2f} s per model)")

    if curve:
        total = 0.0
        for point_setting in dp.SETTINGS:
            point = dp.privacy_utility_experiment(point_setting, n_shadow=big_k)
            total += point.seconds
            lira = ", ".join(f"{variant}: AUC {m['auc']:.3f}, TPR@1% {m['tpr@1%']:.4f}, TPR@0.1% {m['tpr@0.1%']:.4f}"
                             for variant, m in point.lira.items())
            print(f"{point_setting.name}: epsilon {point.report.epsilon:.2f}, test accuracy "
                  f"{point.test_accuracy:.3f} | {lira} | {point.seconds:.1f} s", flush=True)
        print(f"whole curve (K={big_k}): {total:.1f} s")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--curve"]
    main(int(args[0]) if args else 32, "--curve" in sys.argv[1:])
