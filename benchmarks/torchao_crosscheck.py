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
3. torchao's convert step on a CPU, on *untrained* prepared models (torchao's default symmetric
   weights): what works and what type the converted weight has.
4. The symmetric arm end to end: ours ``QuantConfig(4, group_size=32, weight_symmetric=True,
   activation_bits=8)`` against torchao's ``Int8DynamicActivationIntxWeightConfig(int4, PerGroup(32))``
   (the config torchao's QAT -> PTQ convert accepts; its asymmetric fake-quant arms of section 2 have
   no convertible counterpart), both QAT-trained with ``quantization.finetune`` seed 0; torchao then
   converts *that* trained model, and we print its perplexity next to the fake-quantized one.

``--sections 1,4`` runs a subset (the recorded file says which run gave which section).
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
    parser.add_argument("--sections", default="1,2,3,4")
    args = parser.parse_args()
    sections = {int(v) for v in args.sections.split(",")}
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

    if 1 in sections:
        section_1(torch, IntxFakeQuantizeConfig, IntxFakeQuantizer, Q)
    llama = zoo.load("tiny-llama")
    splits = Q.lm_splits(llama.tokenizer)
    if 2 in sections:
        section_2(args, torch, nn, quantize_, IntxFakeQuantizeConfig, QATConfig, pruning, zoo, Q, llama, splits)
    if 3 in sections:
        section_3(torch, nn, quantize_, QATConfig, pruning, zoo, Q, splits)
    if 4 in sections:
        section_4(args, torch, nn, quantize_, QATConfig, pruning, zoo, Q, splits)


def _block_linear_filter(model, nn, pruning):
    """quantize_'s filter_fn for the decoder blocks' linear layers, by qualified name: prepare replaces the
    modules, so a filter by id(module) would match nothing at the convert step (an earlier version of this
    script did that, and its "converted" models were still the fake-quantized ones)."""
    in_blocks = {id(m) for b in pruning.decoder_blocks(model) for m in b.modules()}
    names = {name for name, m in model.named_modules() if id(m) in in_blocks and isinstance(m, nn.Linear)}
    return lambda m, fqn: isinstance(m, nn.Linear) and fqn in names


def _weight_types(model, pruning):
    # by name: after our convert the blocks hold QuantizedLinear layers, which decoder_blocks does not list
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
    weight = q_proj.weight
    return (f"q_proj is {type(q_proj).__name__}, type(q_proj.weight) {type(weight).__name__} "
            f"(isinstance Parameter: {isinstance(weight, __import__('torch').nn.Parameter)}), "
            f"type(weight.data) {type(weight.data).__name__}, dtype {weight.dtype}")


def section_1(torch, IntxFakeQuantizeConfig, IntxFakeQuantizer, Q):
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



def section_2(args, torch, nn, quantize_, IntxFakeQuantizeConfig, QATConfig, pruning, zoo, Q, llama, splits):
    print(f"\n2. QAT of tiny-llama, {args.steps} steps of batch 16, lr 1e-3, seed 0 (quantization.finetune)")
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


def section_3(torch, nn, quantize_, QATConfig, pruning, zoo, Q, splits):
    print("\n3. torchao convert on this CPU (untrained prepared models)")
    from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup

    for label, base in (("Int8DynamicActivationIntxWeightConfig(int4, PerGroup(32))",
                         lambda: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))),
                        ("Int4WeightOnlyConfig(group_size=32)", lambda: Int4WeightOnlyConfig(group_size=32))):
        model = zoo.load("tiny-llama").model
        only_blocks = _block_linear_filter(model, nn, pruning)
        try:
            quantize_(model, QATConfig(base(), step="prepare"), filter_fn=only_blocks)
            quantize_(model, QATConfig(base(), step="convert"), filter_fn=only_blocks)
            ppl = Q.window_perplexity(model, splits.valid)
            fp = zoo.load("tiny-llama").model
            batch = splits.valid[:8]
            print(f"  {label}: converted; {_weight_types(model, pruning)}; perplexity {ppl:.2f}; "
                  f"latency [8, 128] {Q.latency(model, batch) * 1e3:.1f} ms vs fp32 {Q.latency(fp, batch) * 1e3:.1f} ms")
        except Exception as error:  # noqa: BLE001 - report what convert needs
            print(f"  {label}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")


def section_4(args, torch, nn, quantize_, QATConfig, pruning, zoo, Q, splits):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup

    print(f"\n4. symmetric W4A8 (int4 g32 symmetric weights, int8 per-token activations): QAT {args.steps} steps, "
          "seed 0, then convert of the trained model")
    fp = zoo.load("tiny-llama").model
    batch = splits.valid[:8]
    print(f"  fp32 held-out perplexity: {Q.window_perplexity(fp, splits.valid):.2f}")
    for who in ("companion", "torchao"):
        model = zoo.load("tiny-llama").model
        only_blocks = _block_linear_filter(model, nn, pruning)
        base = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))
        if who == "companion":
            Q.prepare_qat(model, Q.QuantConfig(4, group_size=32, weight_symmetric=True, activation_bits=8))
        else:
            quantize_(model, QATConfig(base, step="prepare"), filter_fn=only_blocks)
        ptq = Q.window_perplexity(model, splits.valid)
        started = time.perf_counter()
        Q.finetune(model, splits, steps=args.steps, seed=0)
        seconds = time.perf_counter() - started
        qat = Q.window_perplexity(model, splits.valid)
        if who == "companion":
            Q.convert(model)
        else:
            quantize_(model, QATConfig(base, step="convert"), filter_fn=only_blocks)
        converted = Q.window_perplexity(model, splits.valid)
        print(f"  {who:<9}: PTQ {ptq:.2f}; after QAT (fake-quantized) {qat:.2f}; converted {converted:.2f}  "
              f"({seconds:.0f} s); {_weight_types(model, pruning)}; latency [8, 128] "
              f"{Q.latency(model, batch) * 1e3:.1f} ms vs fp32 {Q.latency(fp, batch) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
