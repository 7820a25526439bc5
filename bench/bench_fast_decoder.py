"""Streaming decode speed at 480x832 per 3-latent-frame block: the Wan VAE (the exact path) against the
TAEHV-architecture fast decoder (pipelines/loading/tiny_decoder.py), both bf16 with random weights (speed does
not depend on the values; how far a real taew2_1.pth moves the frames needs the real file).

    python bench/bench_fast_decoder.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_vae import time_blocks  # noqa: E402
from diffusers import AutoencoderKLWan  # noqa: E402

from pipelines.loading.tiny_decoder import TinyVideoDecoder  # noqa: E402
from pipelines.loading.vae import WanVAE  # noqa: E402
from pipelines.model.acceleration import vae_to_channels_last  # noqa: E402

FRAMES_PER_BLOCK = 12  # output frames of a 3-latent-frame block after the first


def main() -> None:
    torch.backends.cudnn.benchmark = True
    latents = torch.randn(1, 16, 9, 60, 104, device="cuda", dtype=torch.bfloat16)
    vae_model = AutoencoderKLWan().to("cuda", torch.bfloat16)
    vae_to_channels_last(vae_model)
    decoders = {"wan_vae": WanVAE(vae_model), "tiny_decoder": TinyVideoDecoder().to("cuda", torch.bfloat16).eval()}
    results = {}
    for name, decoder in decoders.items():
        time_blocks(decoder, latents, 1)  # warm-up (cuDNN autotuning)
        ms = time_blocks(decoder, latents, 5)
        results[name] = {"ms_per_block": round(ms, 1), "decode_fps": round(FRAMES_PER_BLOCK / ms * 1e3, 1)}
    print(json.dumps({"device": torch.cuda.get_device_name(), "resolution": "832x480", "dtype": "bfloat16",
                      **results}, indent=2))


if __name__ == "__main__":
    main()
