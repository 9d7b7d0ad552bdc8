"""What 2:4 sparsity buys on a GPU: the matmul kernel alone, then a whole Llama-shaped model end to end.

    python benchmarks/gpu_sparse.py

Needs a CUDA GPU of compute capability >= 8.0 (on anything else it says so and exits 0). It is not part
of `make test`; chapter 08 quotes its figures (measured in a session that was lent an H100) as such.

1. The kernel: a dense fp16 matmul against the same 2:4-pruned weight converted by
   ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt / CUTLASS), over shapes of LLaMA-7B's layers.
2. End to end: a randomly initialised model with LLaMA-7B's layer shapes (hidden 4096, MLP 11008, 4 blocks) in fp16 is
   pruned to 2:4 with ``companion.pruning.prune(..., "wanda", pattern="2:4")`` on random calibration
   tokens, converted with ``companion.pruning.to_semi_structured``, and its forward pass is timed against
   the same masked model kept dense; the logits of the two must agree.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def _time(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def matmul_kernel() -> None:
    from torch.sparse import to_sparse_semi_structured

    from companion.pruning import nm_mask

    print("| weight | tokens | dense ms | 2:4 ms | speed-up |")
    print("|---|---|---|---|---|")
    for rows, cols, tokens in ((4096, 4096, 16), (4096, 4096, 2048), (11008, 4096, 2048), (4096, 11008, 2048),
                               (8192, 8192, 4096), (8192, 8192, 16384)):
        weight = torch.randn(rows, cols, device="cuda", dtype=torch.float16)
        weight = weight * nm_mask(weight.abs(), 2, 4)
        # nn.Linear's layout: activations [tokens, in] times weight^T. (``sparse @ x`` with a contiguous
        # [in, tokens] x took a slow path, ~1.3 ms whatever the shape, on torch 2.11 + H100.)
        x = torch.randn(tokens, cols, device="cuda", dtype=torch.float16)
        sparse = to_sparse_semi_structured(weight)
        err = (F.linear(x, weight) - F.linear(x, sparse)).abs().max().item()
        dense_s, sparse_s = _time(lambda: F.linear(x, weight)), _time(lambda: F.linear(x, sparse))
        print(f"| {rows}x{cols} | {tokens} | {dense_s * 1e3:.3f} | {sparse_s * 1e3:.3f} | "
              f"{dense_s / sparse_s:.2f}x | (max abs diff {err:.3g})")


@torch.no_grad()
def whole_model() -> None:
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from companion import pruning

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).to("cuda", torch.float16).eval()
    calib = torch.randint(0, 2048, (32, 256), device="cuda")
    report = pruning.prune(model, "wanda", pattern="2:4", calib=calib)
    print(f"wanda 2:4 on a {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M-parameter model: "
          f"{report.seconds:.2f} s, overall sparsity {report.overall:.3f}")
    sparse_model = copy.deepcopy(model)
    converted = pruning.to_semi_structured(sparse_model)
    print(f"to_semi_structured converted {converted} layers")
    for batch, seq in ((1, 128), (8, 512), (8, 2048)):
        ids = torch.randint(0, 2048, (batch, seq), device="cuda")
        dense_logits = model(input_ids=ids, use_cache=False).logits
        sparse_logits = sparse_model(input_ids=ids, use_cache=False).logits
        diff = (dense_logits - sparse_logits).abs().max().item()
        dense_s = _time(lambda: model(input_ids=ids, use_cache=False), 20)
        sparse_s = _time(lambda: sparse_model(input_ids=ids, use_cache=False), 20)
        print(f"forward {batch}x{seq}: dense(masked) {dense_s * 1e3:.2f} ms, 2:4 {sparse_s * 1e3:.2f} ms, "
              f"speed-up {dense_s / sparse_s:.2f}x, max |logit diff| {diff:.3g}")


if __name__ == "__main__":
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        print("skipped: needs a CUDA GPU of compute capability >= 8.0")
    else:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"cuSPARSELt {torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else 'absent'}")
        matmul_kernel()
        try:
            whole_model()
        except Exception as error:  # report, do not hide: the kernel table above still stands
            print(f"whole-model check failed: {type(error).__name__}: {error}")
            raise
