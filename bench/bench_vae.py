"""Streaming Wan VAE decode speed at 480x832 (one 3-latent-frame block) under kernel settings.

    python bench/bench_vae.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diffusers import AutoencoderKLWan  # noqa: E402

from pipelines.loading.vae import WanVAE  # noqa: E402
from pipelines.model.acceleration import vae_to_channels_last  # noqa: E402


def time_blocks(vae, latents: torch.Tensor, repeats: int = 3) -> float:
    """Median ms per 3-latent-frame block of vae.stream().decode_block (any streaming decoder)."""
    times = []
    for _ in range(repeats):
        stream = vae.stream()
        for block in latents.split(3, dim=2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            stream.decode_block(block)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    model = AutoencoderKLWan().to("cuda", torch.bfloat16)
    vae = WanVAE(model)
    latents = torch.randn(1, 16, 9, 60, 104, device="cuda", dtype=torch.bfloat16)
    print(f"default: {time_blocks(vae, latents):.0f} ms/block")
    torch.backends.cudnn.benchmark = True
    time_blocks(vae, latents, 1)
    print(f"cudnn.benchmark: {time_blocks(vae, latents):.0f} ms/block")
    vae_to_channels_last(model)
    time_blocks(vae, latents, 1)
    print(f"cudnn.benchmark + channels_last_3d: {time_blocks(vae, latents):.0f} ms/block")
    stream = vae.stream()
    stream.decode_block(latents[:, :, :3])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        stream.decode_block(latents[:, :, 3:6])
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70))


if __name__ == "__main__":
    main()
