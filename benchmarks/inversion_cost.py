"""Chapter 04: what each inversion attack costs per recovered image, in queries (or passes) and seconds.

    python benchmarks/inversion_cost.py

The settings of notebooks/04_model_inversion.ipynb on the digits target (50 attacks, 5 per class, the
same random starts): white-box MI-Face (100 steps: one forward and one backward pass per step),
black-box NES (1,600 queries per image), random search (1,600 queries per image) and the Yang-style
inverter (600 training queries once, then one query per reconstructed image; 300 reconstructions).
Seconds are wall time on this machine divided by the number of images; the README records a run.
"""

from __future__ import annotations

import time


def main() -> None:
    import torch

    import companion
    from companion import inversion as inv
    from companion import zoo

    print(companion.setup(seed=0))
    target = zoo.load(inv.TARGET).model
    roles = inv.digit_roles()
    classes = torch.arange(10).repeat(5)
    starts = torch.rand(len(classes), 64, generator=torch.Generator().manual_seed(0))
    n = len(classes)

    start = time.perf_counter()
    inv.mi_face(target, classes, steps=100, lr=0.1, prior="tv", init=starts)
    seconds = time.perf_counter() - start
    print(f"MI-Face (white box): 100 forward + 100 backward passes per image, {1e3 * seconds / n:.1f} ms per image")

    api = inv.ProbabilityAPI(target)
    start = time.perf_counter()
    inv.nes_inversion(api, classes, queries=1600, prior="tv", init=starts)
    seconds = time.perf_counter() - start
    print(f"NES (black box): {api.queries // n} queries per image, {1e3 * seconds / n:.1f} ms per image")

    api = inv.ProbabilityAPI(target)
    start = time.perf_counter()
    pool = torch.rand(1600, n, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores = torch.stack([api(pool[i]).gather(1, classes[:, None]).squeeze(1) for i in range(1600)])
    pool[scores.argmax(0), torch.arange(n)]
    seconds = time.perf_counter() - start
    print(f"random search: {api.queries // n} queries per image, {1e3 * seconds / n:.1f} ms per image")

    api = inv.ProbabilityAPI(target)
    start = time.perf_counter()
    net, _ = inv.train_inverter(api, roles.x_aux, epochs=100, batch_size=128)
    trained = time.perf_counter() - start
    start = time.perf_counter()
    inv.invert(net, api, roles.x_private[:300])
    per_image = (time.perf_counter() - start) / 300
    print(f"inverter (training-based): {len(roles.x_aux)} queries and {trained:.1f} s to train once, "
          f"then 1 query and {1e3 * per_image:.3f} ms per reconstructed image")


if __name__ == "__main__":
    main()
