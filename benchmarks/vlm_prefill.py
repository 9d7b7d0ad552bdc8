"""Chapter 10's cost measurements on this CPU (not part of make test).

    python benchmarks/vlm_prefill.py

1. Projector parameters and FLOPs (``torch.utils.flop_counter``: matmuls and convolutions) at the chapter's
   scale (d_v = d_t = 64, 64 patches) and at MobileVLM-1.7B's (CLIP ViT-L/14-336: d_v = 1024, 576 patches;
   MobileLLaMA 1.4B: d_t = 2048).
2. LM prefill latency (batch 1, median of 20) vs the number of visual tokens, for the chapter's tiny LM
   (width 64, 2 layers) and a wider one (width 512, 8 layers, untrained: timing only), with the prefill
   FLOPs beside it (linear layers counted by ``torch.utils.flop_counter`` plus the attention products
   ``QK^T`` and ``AV`` added analytically over the full T x T, ``vlm.attention_flops``) and the prefill
   throughput in tokens/s ((visual + 10 text tokens) / median latency).
"""

from __future__ import annotations

import companion
from companion import vlm


def main() -> None:
    print(companion.setup(seed=0))
    print("projector  tokens(64)  params(64/64)  MFLOPs(64)  tokens(576)  params(1024/2048)  GFLOPs(576)")
    for name in vlm.PROJECTORS:
        small, large = vlm.make_projector(name, 64, 64), vlm.make_projector(name, 1024, 2048)
        print(f"{name:9s}  {small.out_tokens(64):10d}  {vlm.parameter_count(small):13,d}  "
              f"{vlm.projector_flops(small, 64) / 1e6:10.2f}  {large.out_tokens(576):11d}  "
              f"{vlm.parameter_count(large):17,d}  {vlm.projector_flops(large, 576) / 1e9:11.2f}")
    tok = vlm.shapes_tokenizer()
    for text in (vlm.TextConfig(), vlm.TextConfig(hidden=512, layers=8, heads=8, intermediate=1536)):
        model = vlm.build_tiny_vlm("mlp", tok, text=text)
        print(f"\nLM width {text.hidden}, {text.layers} layers: visual tokens, prefill MFLOPs (of which "
              f"attention), median ms, prefill tokens/s")
        for n in (16, 36, 64, 144, 256, 576):
            seconds = vlm.prefill_latency(model, n)
            print(f"{n:5d}  {vlm.prefill_flops(model, n) / 1e6:10.1f}  ({vlm.attention_flops(model, n + 10) / 1e6:8.1f})"
                  f"  {seconds * 1e3:8.2f}  {(n + 10) / seconds:9.0f}")


if __name__ == "__main__":
    main()
