"""Chapter 06's costs: training time per defence and generation speed with and without segment embeddings.

    python benchmarks/injection_cost.py [--steps 20]

From ``inject-undefended``, on the same StruQ training samples: seconds per optimiser step of StruQ
(supervised fine-tuning, loss on the reply), ISE (the same plus a segment-embedding hook) and SecAlign
(DPO: four forward passes and one backward pass per step, half the batch in pairs so each step sees the
same number of sequences). Then greedy generation tokens/s on 80 held-out prompts with and without the
segment-embedding hook (a zero-initialised ISE embedding: the same replies, the hook's cost only).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    import companion
    from companion import injection, zoo

    print(companion.setup(seed=0))
    tok = zoo.load("inject-undefended").tokenizer
    samples = injection.struq_dataset(injection.task_people("train"), 800, seed=11)
    timings = {}
    for name in ("StruQ", "ISE", "SecAlign"):
        model = zoo.load("inject-undefended").model
        started = time.perf_counter()
        if name == "SecAlign":
            injection.secalign_finetune(model, tok, injection.preference_pairs(samples), steps=args.steps,
                                        batch_size=8)
        else:
            wrapped = injection.with_segments(model) if name == "ISE" else None
            injection.struq_finetune(model, tok, samples, steps=args.steps, batch_size=16, wrapped=wrapped)
        timings[name] = (time.perf_counter() - started) / args.steps
        print(f"{name:>8}: {timings[name] * 1000:7.1f} ms per step (16 sequences per step)")
    prompts = injection.make_tasks(injection.task_people("test"), 80, "test", seed=1)
    model = zoo.load("inject-undefended").model
    for label in ("plain", "segment embeddings"):
        wrapped = injection.with_segments(model) if label != "plain" else None
        started = time.perf_counter()
        out = injection.evaluate(model, tok, prompts, "structured", wrapped=wrapped, max_new_tokens=8)
        seconds = time.perf_counter() - started
        tokens = sum(len(tok(r, add_special_tokens=False)["input_ids"]) + 1 for r in out["replies"])
        print(f"{label:>20}: {tokens / seconds:8.0f} generated tokens/s ({seconds:.2f} s for 80 prompts)")
        if wrapped is not None:
            wrapped.remove()


if __name__ == "__main__":
    main()
