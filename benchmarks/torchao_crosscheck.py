"""companion.quantization side by side with torchao's QAT (pip ``torchao``) on the same tensor and model.

    python benchmarks/torchao_crosscheck.py [--steps 60]

torchao is not in requirements.txt: once installed, ``transformers`` imports it whenever it loads a
model, and on a CPU-only torch its import logs "Failed to load ..." for its CUDA extensions, which would
change every chapter's output. So this script installs ``torchao==0.18.0`` with ``--no-deps`` (it must
not replace the course's torch) into ``benchmarks/results/torchao-site`` (git-ignored) and re-runs itself
with that folder on ``PYTHONPATH``. Output recorded in ``benchmarks/recorded/torchao_crosscheck.txt``.

1. The fake quantizers on one tensor: per-token int8 activations, per-group int4 / int2 weights.
2. QAT of tiny-llama through both, with the same fine-tuning procedure (``quantization.finetune``,
   seed 0): W2 (asymmetric, group 32) weight-only and W4A8 (int4 group 32 weights, int8 asymmetric
   per-token activations). Only the decoder blocks' linear layers are quantized in both.
3. torchao's convert step on a CPU: what works and what needs a GPU kernel.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SITE = HERE / "results" / "torchao-site"
VERSION = "0.18.0"


def ensure_torchao() -> None:
    try:
        import torchao  # noqa: F401
        return
    except ImportError:
        pass
    if os.environ.get("_TORCHAO_CROSSCHECK_CHILD"):
        sys.exit("torchao could not be imported even from benchmarks/results/torchao-site")
    if not (SITE / "torchao").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(SITE),
                        f"torchao=={VERSION}"], check=True)
    env = dict(os.environ, _TORCHAO_CROSSCHECK_CHILD="1",
               PYTHONPATH=os.pathsep.join([str(SITE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    sys.exit(subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env).returncode)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    ensure_torchao()
    import torch
    import torchao
    from torch import nn
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    import companion
    from companion import pruning, zoo
    from companion import quantization as Q

    print(companion.setup(seed=0))
    print(f"torchao {torchao.__version__}, torch {torch.__version__}")

    print("\n1. fake quantizers on one tensor (16 x 64 standard normal)")
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    theirs = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False))(x)
    ours = Q.fake_quantize(x, 8, "per_token", symmetric=False)
    print(f"  int8 per-token asymmetric: identical = {torch.equal(theirs, ours)}, max |diff| = "
          f"{(theirs - ours).abs().max():.2e}")
    for dtype, bits in ((torch.int4, 4), (torch.int2, 2)):
        for symmetric in (True, False):
            theirs = IntxFakeQuantizer(IntxFakeQuantizeConfig(dtype, group_size=32, is_symmetric=symmetric))(x)
            ours = Q.fake_quantize(x, bits, "per_group", symmetric=symmetric, group_size=32)
            print(f"  int{bits} group 32 {'symmetric ' if symmetric else 'asymmetric'}: MSE ours {(ours - x).pow(2).mean():.4f}"
                  f", torchao {(theirs - x).pow(2).mean():.4f}, values differ in {(ours != theirs).float().mean():.1%}")

    print(f"\n2. QAT of tiny-llama, {args.steps} steps of batch 16, lr 1e-3, seed 0 (quantization.finetune)")
    llama = zoo.load("tiny-llama")
    splits = Q.lm_splits(llama.tokenizer)
    print(f"  fp32 held-out perplexity: {Q.window_perplexity(llama.model, splits.valid):.2f}")
    arms = {
        "W2 g32 weight-only": (Q.QuantConfig(2, group_size=32),
                               dict(weight_config=IntxFakeQuantizeConfig(torch.int2, group_size=32, is_symmetric=False))),
        "W4A8 (g32, per-token)": (Q.QuantConfig(4, group_size=32, activation_bits=8),
                                  dict(activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
                                       weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=False))),
    }
    in_blocks = {id(m) for b in pruning.decoder_blocks(llama.model) for m in b.modules()}
    for name, (ours_config, theirs_kwargs) in arms.items():
        for who in ("companion", "torchao"):
            model = zoo.load("tiny-llama").model
            if who == "companion":
                Q.prepare_qat(model, ours_config)
            else:
                ids = {id(m) for b in pruning.decoder_blocks(model) for m in b.modules()}
                quantize_(model, QATConfig(**theirs_kwargs, step="prepare"),
                          filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and id(m) in ids)
            ptq = Q.window_perplexity(model, splits.valid)
            started = time.perf_counter()
            Q.finetune(model, splits, steps=args.steps, seed=0)
            seconds = time.perf_counter() - started
            print(f"  {name:<22} {who:<9}: prepared, untrained (PTQ) {ptq:7.2f}; after QAT {Q.window_perplexity(model, splits.valid):7.2f}"
                  f"  ({seconds:.0f} s)")
    del in_blocks

    print("\n3. torchao convert on this CPU")
    from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup

    for label, base in (("Int8DynamicActivationIntxWeightConfig(int4, PerGroup(32))",
                         lambda: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))),
                        ("Int4WeightOnlyConfig(group_size=32)", lambda: Int4WeightOnlyConfig(group_size=32))):
        model = zoo.load("tiny-llama").model
        ids = {id(m) for b in pruning.decoder_blocks(model) for m in b.modules()}
        only_blocks = lambda m, fqn: isinstance(m, nn.Linear) and id(m) in ids  # noqa: E731
        try:
            quantize_(model, QATConfig(base(), step="prepare"), filter_fn=only_blocks)
            quantize_(model, QATConfig(base(), step="convert"), filter_fn=only_blocks)
            weight = pruning.decoder_blocks(model)[0].self_attn.q_proj.weight
            ppl = Q.window_perplexity(model, splits.valid)
            fp = zoo.load("tiny-llama").model
            batch = splits.valid[:8]
            print(f"  {label}: converted; q_proj is {type(pruning.decoder_blocks(model)[0].self_attn.q_proj).__name__}, "
                  f"its weight a {type(weight.data).__name__} of dtype {weight.dtype}; perplexity {ppl:.2f}; "
                  f"latency [8, 128] {Q.latency(model, batch) * 1e3:.1f} ms vs fp32 {Q.latency(fp, batch) * 1e3:.1f} ms")
        except Exception as error:  # noqa: BLE001 - report what convert needs
            print(f"  {label}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")


if __name__ == "__main__":
    main()
