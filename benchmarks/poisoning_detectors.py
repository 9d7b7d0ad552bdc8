"""Poison-detector cost: seconds per 10,000 training examples for each detector of chapter 03.

    python benchmarks/poisoning_detectors.py

Image detectors on 10,000 digits-shaped inputs (the chapter's 64 -> 256 -> 10 MLP, 10 classes, 5%
BadNets poisons): penultimate features + spectral signatures, + activation clustering (PCA to 10 dims,
2-means per class), STRIP with 16 overlays. Text: the corpus n-gram scan on 10,000 60-word chunks of
the documentation corpus, and ONION on 200 held-out 20-word prompts scored by tiny-llama (n + 1 LM
passes per prompt), scaled to 10,000 prompts.
"""

from __future__ import annotations

import time


def main() -> None:
    import torch

    import companion
    from companion import data, poisoning, zoo

    print(companion.setup(seed=0))
    splits = data.digits_splits(seed=0)
    reps = 10_000 // len(splits.x_train) + 1
    x = splits.x_train.repeat(reps, 1)[:10_000]
    y = splits.y_train.repeat(reps)[:10_000]
    trigger = poisoning.patch_trigger(3)
    poisoned = poisoning.poison_images(x, y, trigger, target=0, rate=0.05, seed=0)
    model = poisoning.train_digits_model(splits.x_train, splits.y_train, seed=0, epochs=10)

    def timed(label, fn):
        started = time.perf_counter()
        fn()
        print(f"{label:<42} {time.perf_counter() - started:8.2f} s per 10k examples", flush=True)

    features = poisoning.penultimate_features(model, poisoned.x)
    timed("penultimate features", lambda: poisoning.penultimate_features(model, poisoned.x))
    timed("spectral signatures", lambda: poisoning.spectral_signature_scores(features, poisoned.y))
    timed("activation clustering", lambda: poisoning.activation_clusters(features, poisoned.y))
    timed("STRIP (16 overlays)", lambda: poisoning.strip_scores(model, poisoned.x, splits.x_test))

    chunks = poisoning.split_into_chunks([d.text for d in zoo.corpus().train_docs], 60)
    chunks = (chunks * (10_000 // len(chunks) + 1))[:10_000]
    timed("n-gram scan (60-word chunks)", lambda: poisoning.ngram_scan(chunks))
    llama = zoo.load("tiny-llama")
    prompts = [" ".join(c.split(" ")[:20]) for c in chunks[:200]]
    started = time.perf_counter()
    poisoning.onion_scores(llama.model, llama.tokenizer, prompts)
    seconds = (time.perf_counter() - started) * 10_000 / len(prompts)
    print(f"{'ONION (20-word prompts, tiny-llama)':<42} {seconds:8.2f} s per 10k examples (from 200)")


if __name__ == "__main__":
    main()
