"""Cost and benefit of companion.quantization on this CPU.

    python benchmarks/quantization_speed.py               # all three parts
    python benchmarks/quantization_speed.py --steps-only  # part 1 only (about a minute)

1. One fine-tuning step of tiny-llama (batch 16 x 128 tokens): fp32 vs fake-quantized W4 g32, W2 g32,
   W4A8 (the QAT overhead). The arms are timed interleaved (one step of each, ``ROUNDS`` times) so that a
   change in the machine's load hits all of them alike; the median, the quartiles and the range of the
   per-step time are printed, and the ratio of medians to fp32.
2. tiny-llama converted: state_dict bytes and the median forward time on 8 x 128 tokens for fp32, W8
   weight-only, W8A8 through ``torch._int_mm`` and W4 g32 weight-only (dequantized in each forward pass).
3. One large linear layer (4096 x 4096, 2,048 tokens and 16 tokens): fp32 ``F.linear`` vs our int8
   ``torch._int_mm`` path vs PyTorch's (deprecated) ``torch.ao`` dynamic int8 ``Linear`` (fbgemm / x86).
"""

from __future__ import annotations

import copy
import sys
import time
import warnings

import torch
from torch import nn

import companion
from companion import quantization as Q
from companion import zoo
from companion.runtime import median_seconds
from companion.train import mixed_batches


ROUNDS = 15


def main() -> None:
    print(companion.setup(seed=0))
    llama = zoo.load("tiny-llama")
    splits = Q.lm_splits(llama.tokenizer)
    batch = next(mixed_batches([splits.docs, splits.bios], [8, 8], seed=0))

    print(f"\n1. one training step (forward + backward + AdamW), batch 16 x 128, {ROUNDS} interleaved rounds")
    configs = {"fp32": None, "W4 g32": Q.QuantConfig(4), "W2 g32": Q.QuantConfig(2),
               "W4A8": Q.QuantConfig(4, activation_bits=8)}
    steps = {}
    for name, config in configs.items():
        model = copy.deepcopy(llama.model)
        if config is not None:
            Q.prepare_qat(model, config)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer):
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        steps[name] = step
    times = {name: [] for name in configs}
    for round_ in range(ROUNDS + 2):  # the first two rounds are warm-up
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            if round_ >= 2:
                times[name].append(time.perf_counter() - started)
    base = float(torch.tensor(times["fp32"]).median())
    for name, t in times.items():
        t = torch.tensor(t) * 1e3
        q1, med, q3 = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=t.dtype)).tolist()
        print(f"  {name:<7} median {med:7.1f} ms  (quartiles {q1:.1f}-{q3:.1f}, range {t.min():.1f}-{t.max():.1f})"
              f"  {med / 1e3 / base:.2f}x fp32")
    if "--steps-only" in sys.argv:
        return

    print("\n2. tiny-llama converted: size and forward time on 8 x 128 tokens")
    inputs = splits.valid[:8]
    fp = llama.model
    fp_time = Q.latency(fp, inputs)
    print(f"  {'fp32':<22} {Q.model_bytes(fp):>10,} bytes  {fp_time * 1e3:7.1f} ms")
    for name, config in (("W8 weight-only", Q.QuantConfig(8, "per_channel", None)),
                         ("W8A8 int8 matmul", Q.QuantConfig(8, "per_channel", None, weight_symmetric=True,
                                                            activation_bits=8, activation_symmetric=True)),
                         ("W4 g32 weight-only", Q.QuantConfig(4)),
                         ("W2 g32 weight-only", Q.QuantConfig(2))):
        model = Q.convert(Q.prepare_qat(copy.deepcopy(fp), config))
        seconds = Q.latency(model, inputs)
        print(f"  {name:<22} {Q.model_bytes(model):>10,} bytes  {seconds * 1e3:7.1f} ms  ({seconds / fp_time:.2f}x)")

    print("\n3. one 4096 x 4096 linear layer")
    layer = nn.Linear(4096, 4096, bias=False)
    int8 = Q.QuantizedLinear(Q.FakeQuantLinear(layer, Q.QuantConfig(8, "per_channel", None, weight_symmetric=True,
                                                                     activation_bits=8, activation_symmetric=True)))
    w4 = Q.QuantizedLinear(Q.FakeQuantLinear(layer, Q.QuantConfig(4, group_size=128)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        ao = quantize_dynamic(nn.Sequential(layer), {nn.Linear}, dtype=torch.qint8)
    for tokens in (2048, 16):
        x = torch.randn(tokens, 4096)
        with torch.no_grad():
            fp_s = median_seconds(lambda: layer(x))
            print(f"  {tokens:>5} tokens: fp32 {fp_s * 1e3:7.2f} ms; ours int8 _int_mm {median_seconds(lambda: int8(x)) / fp_s:.2f}x; "
                  f"ours W4 g128 dequantize + matmul {median_seconds(lambda: w4(x)) / fp_s:.2f}x; "
                  f"torch.ao dynamic int8 {median_seconds(lambda: ao(x)) / fp_s:.2f}x")
    print(f"  weight bytes: fp32 {4096 * 4096 * 4:,}; int8 {int8.packed.numel() + 2 * int8.scale.numel():,}; "
          f"W4 g128 {sum(b.numel() * b.element_size() for b in w4.buffers()):,}")


if __name__ == "__main__":
    main()
