"""Self-attention kernel speed at the shapes of one causal block (3 latent frames at 480x832).

A block's queries (4680 tokens, 12 heads of 128) attend to the KV cache, which grows from one
block (4680 keys) to seven (32760). Attention is most of the denoising time at these lengths,
so the backend choice matters; this times each scaled_dot_product_attention backend and
reports TFLOP/s (4 * Lq * Lk * heads * head_dim per call).

    python bench/bench_attention.py --out bench/results/h100_attention.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_backend(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float | None:
    """Median ms of one call in the model's [B, L, H, D] -> transposed layout, None if unsupported."""
    def call() -> torch.Tensor:
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    try:
        with sdpa_kernel([backend]):
            return do_bench(call, warmup=50, rep=300, return_mode="median")
    except RuntimeError as error:
        print(f"  {backend.name}: unsupported ({str(error).splitlines()[0]})")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-tokens", type=int, default=4680)
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for cached_blocks in range(1, args.blocks + 1):
        keys = cached_blocks * args.block_tokens
        q = torch.randn(1, args.block_tokens, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, keys, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16) for _ in "kv")
        flops = 4 * args.block_tokens * keys * args.heads * args.head_dim
        row = {"keys": keys}
        for name, backend in BACKENDS.items():
            ms = time_backend(backend, q, k, v)
            row[name] = None if ms is None else {"ms": ms, "tflops": flops / ms / 1e9}
        rows.append(row)
        print(f"keys={keys:6d} " + " ".join(
            f"{name}={row[name]['ms']:.2f}ms/{row[name]['tflops']:.0f}TF" for name in BACKENDS if row[name]))
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cudnn": torch.backends.cudnn.version(), "command": " ".join(["python"] + sys.argv), "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
