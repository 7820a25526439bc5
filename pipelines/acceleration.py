"""GPU speed settings that leave results unchanged up to kernel choice."""
from __future__ import annotations

import logging

import torch

from .weights import Components

log = logging.getLogger(__name__)


def accelerate(components: Components, compile_models: bool = False) -> None:
    """cuDNN autotuning and channels-last VAE convs; optionally torch.compile DiT blocks and VAE decoder.

    Block shapes are fixed for a given resolution, so cuDNN's per-shape algorithm search and
    inductor's autotuning are paid once (first generation) and reused by every later block.
    """
    if components.generator.patch_embedding.weight.device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    vae_to_channels_last(components.vae.model)
    if compile_models:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        components.generator.compile_blocks(mode="max-autotune-no-cudagraphs", dynamic=False)
        # The decoder's many small norm/activation/pad/cat kernels fuse into few memory passes.
        components.vae.model.decoder.compile(dynamic=False)
        log.info("torch.compile enabled for the generator blocks and VAE decoder (first generation compiles)")


def vae_to_channels_last(model: torch.nn.Module) -> None:
    """Stores the 3D conv weights channels-last so cuDNN can pick its NDHWC kernels."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.to(memory_format=torch.channels_last_3d)
