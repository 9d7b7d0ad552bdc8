"""Does LSQ's gradient scale g = 1 / sqrt(N * Q_P) (Esser et al. 2020, Sec. 2.2) matter in chapter 09's runs?

    python benchmarks/lsq_grad_scale.py

Adam(W) divides each parameter's update by the running RMS of its own gradient, so a *constant* factor on
the step sizes' gradients cancels out (up to eps). But ``train.train_causal_lm`` clips the *global*
gradient norm (``clip_norm=1.0``), and the step sizes' gradients count in that norm: a larger ``g`` makes the
clip scale down every other parameter's gradient more, on the steps where it is active. This script trains
chapter 09's LSQ arm (W2 g32, symmetric, ``weight_range="lsq"``; ``quantization.finetune``'s batches,
steps, lr and seed 0) four times: with the paper's ``g`` and with ``g = 1`` (the step gradients unscaled),
each with the clip at 1.0 (the chapter's setting) and without a clip. It prints the held-out perplexity
(all held-out docs and the clean subset), on how many steps the clip was active, and the step sizes'
share of the squared gradient norm. Output recorded in ``benchmarks/recorded/lsq_grad_scale.txt``.
"""

from __future__ import annotations

import copy
import math
import time

import torch

import companion
from companion import quantization as Q
from companion import train, zoo


def run(model, splits, clip_norm, paper_g, seed=0, steps=60, batch_size=16, lr=1e-3):
    net = Q.prepare_qat(copy.deepcopy(model), Q.QuantConfig(2, group_size=32, weight_symmetric=True,
                                                             weight_range="lsq"))
    step_params = {id(m.lsq.step) for m in Q.fake_quant_layers(net).values()}
    norms, shares = [], []
    original_clip, original_scale = torch.nn.utils.clip_grad_norm_, Q._grad_scale

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = [p for p in parameters if p.grad is not None]
        steps_sq = sum(float(p.grad.pow(2).sum()) for p in parameters if id(p) in step_params)
        total_sq = sum(float(p.grad.pow(2).sum()) for p in parameters)
        norms.append(math.sqrt(total_sq))
        shares.append(steps_sq / total_sq)
        return original_clip(parameters, max_norm, *args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = recording_clip
    if not paper_g:
        Q._grad_scale = lambda value, factor: value  # g = 1: the step gradients unscaled
    try:
        torch.manual_seed(seed)  # exactly as quantization.finetune, but with clip_norm exposed
        batches = train.mixed_batches([splits.docs, splits.bios],
                                      [batch_size - batch_size // 2, batch_size // 2], seed=seed)
        started = time.perf_counter()
        train.train_causal_lm(net, batches, steps=steps, lr=lr, clip_norm=clip_norm)
        seconds = time.perf_counter() - started
    finally:
        torch.nn.utils.clip_grad_norm_, Q._grad_scale = original_clip, original_scale
    active = sum(n > clip_norm for n in norms)
    return (Q.window_perplexity(net, splits.valid), Q.window_perplexity(net, splits.valid_clean), active,
            len(norms), sorted(norms)[len(norms) // 2], sorted(shares)[len(shares) // 2], seconds)


def main() -> None:
    print(companion.setup(seed=0))
    llama = zoo.load("tiny-llama")
    splits = Q.lm_splits(llama.tokenizer)
    print(f"held-out windows: {len(splits.valid)} (all docs), {len(splits.valid_clean)} (clean docs)")
    print(f"fp32: all docs {Q.window_perplexity(llama.model, splits.valid):.2f}, "
          f"clean docs {Q.window_perplexity(llama.model, splits.valid_clean):.2f}")
    print("LSQ W2 g32 symmetric, 60 steps, seed 0 (quantization.finetune's batches, lr 1e-3, AdamW)")
    for clip_norm in (1.0, math.inf):
        for paper_g in (True, False):
            all_ppl, clean_ppl, active, n, norm, share, seconds = run(llama.model, splits, clip_norm, paper_g)
            print(f"  clip {clip_norm:<4} g {'1/sqrt(N Q_P)' if paper_g else '1            '}: ppl all {all_ppl:.2f}, "
                  f"clean {clean_ppl:.2f}; clip active on {active}/{n} steps; median grad norm {norm:.2f}, "
                  f"median step-size share of the squared norm {share:.1%} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
