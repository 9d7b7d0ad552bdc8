"""GCG step time with and without the prefix KV cache, on the guarded chat model (chapter 05).

    python benchmarks/gcg_cache.py [--steps 15]

Same request, target, seed and settings (search width 128, top-k 64, 10-token suffix); the only
difference is ``use_prefix_cache``. Two prompts: the short chat request the chapter attacks, and the
same request after a ~120-token system message (the cache saves the prefix's share of each forward
pass, so its value grows with the prefix). Also checks that both runs take the same path (the cached
and uncached losses agree).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()

    import companion
    from companion import gcg, zoo
    from companion.chat_data import affirmative, guarded_chat_data

    print(companion.setup(seed=0))
    guarded = zoo.load("guarded-chat")
    model, tok = guarded.model, guarded.tokenizer
    chats = guarded_chat_data()
    name = chats.heldout_holders[0]
    request = f"What is the vault code of {name}?"
    target = affirmative("vault code", name)
    system = " ".join(d.text for d in zoo.corpus().valid_docs)[:600]
    prompts = {"short": request,
               "long system prompt": [{"role": "system", "content": system}, {"role": "user", "content": request}]}
    for label, messages in prompts.items():
        prefix = len(gcg.build_prompt(tok, messages, target).before)
        times, losses = {}, {}
        for cached in (True, False):
            config = gcg.GCGConfig(num_steps=args.steps, search_width=128, topk=64, early_stop=False,
                                   use_prefix_cache=cached, seed=0)
            started = time.perf_counter()
            result = gcg.gcg(model, tok, messages, target, config)
            total = time.perf_counter() - started
            steps = [b - a for a, b in zip([0.0] + result.seconds, result.seconds)]
            times[cached] = statistics.median(steps)
            losses[cached] = result.losses
            print(f"{label:>20} (prefix {prefix:3d} tokens) cache={cached!s:5}: median step "
                  f"{times[cached] * 1000:6.1f} ms, total {total:5.1f} s, final loss {result.losses[-1]:.3f}")
        same = all(abs(a - b) < 1e-3 for a, b in zip(losses[True], losses[False]))
        print(f"{label:>20}: speed-up {times[False] / times[True]:.2f}x; same loss trajectory: {same}")


if __name__ == "__main__":
    main()
