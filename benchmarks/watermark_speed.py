"""Watermark detection throughput (tokens/s) against transformers' WatermarkDetector, and the
generation overhead of each scheme's LogitsProcessor, on the tiny Llama.

    python benchmarks/watermark_speed.py

Detection: 512 texts of 112 tokens (16-token prompt + 96 scored), KGW lefthash h=1, gamma 0.25, both
detectors de-duplicating repeated bigrams; the z-scores must agree. Generation: 64 prompts x 96 new
tokens, multinomial sampling, with no processor and with each scheme's.
"""

from __future__ import annotations

import time

import numpy as np
import torch


def main() -> None:
    import companion
    from companion import watermark as W
    from companion import zoo
    from transformers import WatermarkDetector, WatermarkingConfig

    print(companion.setup(seed=0))
    llama = zoo.load("tiny-llama")
    model, tok = llama.model, llama.tokenizer
    V = model.get_output_embeddings().weight.shape[0]
    stream = [i for d in zoo.corpus().train_docs for i in tok(d.text)["input_ids"]]
    windows = [stream[i * 112: (i + 1) * 112] for i in range(len(stream) // 112)]
    texts = [t for t in windows if t[15] != tok.bos_token_id][:512]  # transformers drops a leading BOS
    key = 12345
    ours = W.KGW(V, 0.25, 2.0, key)
    ours.detect_many(texts[:4], prompt_length=16)  # build the V green lists once (cached)
    started = time.perf_counter()
    mine = ours.detect_many(texts, prompt_length=16)["z"]
    t_ours = time.perf_counter() - started
    started = time.perf_counter()
    one_by_one = np.array([ours.detect(t, prompt_length=16)["z"] for t in texts])
    t_loop = time.perf_counter() - started
    detector = WatermarkDetector(model.config, "cpu", WatermarkingConfig(greenlist_ratio=0.25, bias=2.0,
                                                                         hashing_key=key),
                                 ignore_repeated_ngrams=True, max_cache_size=4096)
    batch = torch.tensor([t[15:] for t in texts])  # the last prompt token seeds the first scored position
    detector(batch[:4])
    started = time.perf_counter()
    theirs = detector(batch, return_dict=True).z_score
    t_hf = time.perf_counter() - started
    tokens = 512 * 96
    print(f"detection, {tokens} scored tokens: companion batched {tokens / t_ours:,.0f} tok/s, "
          f"companion one text at a time {tokens / t_loop:,.0f} tok/s, transformers {tokens / t_hf:,.0f} tok/s; "
          f"max |z difference| {max(np.abs(mine - theirs).max(), np.abs(one_by_one - theirs).max()):.1e}")

    prompts = [stream[i * 977: i * 977 + 16] for i in range(64)]
    schemes = {"none": None, "KGW h=1": W.KGW(V, key=key), "KGW h=4 hash": W.KGW(V, key=key, context=4, prf="hash"),
               "KGW-self h=4 hash": W.KGW(V, key=key, seeding="selfhash", context=4, prf="hash"),
               "Unigram": W.Unigram(V, key=key), "Gumbel h=4": W.GumbelWatermark(V, key=key)}
    W.sample(model, prompts[:8], [], 16, pad_id=tok.pad_token_id)  # warm-up
    base = None
    for name, wm in schemes.items():
        started = time.perf_counter()
        W.sample(model, prompts, [wm.processor()] if wm else [], 96, seed=0, pad_id=tok.pad_token_id)
        seconds = time.perf_counter() - started
        base = base or seconds
        print(f"generation {name:>18}: {64 * 96 / seconds:,.0f} tok/s ({seconds / base:.2f}x the time of no watermark)")


if __name__ == "__main__":
    main()
