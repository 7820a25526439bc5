"""GPU speed settings that leave results unchanged up to kernel choice."""
from __future__ import annotations

import logging
import types

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

from ..loading.weights import Components

log = logging.getLogger(__name__)
# max-autotune-no-cudagraphs without its coordinate-descent tuning: inductor autotunes the bf16 GEMMs
# once per shape and keeps the result in the compile cache, whereas the descent re-benchmarked ~120
# pointwise/norm kernel variants on every start, cached or not (26-56 s of an H100 restart).
BLOCK_COMPILE_OPTIONS = {"max_autotune": True, "coordinate_descent_tuning": False, "triton.cudagraphs": False}
# FP8 blocks (fp8.py) keep cuBLAS/CUTLASS for their scaled GEMMs: autotuning Triton variants of one FP8
# GEMM shape took 164 s on an H100, minutes of warm-up per shape for a ~20 % faster kernel.
FP8_BLOCK_COMPILE_OPTIONS = {"max_autotune": False, "triton.cudagraphs": False}


def accelerate(components: Components, compile_models: bool = False, fp8: bool = False) -> bool:
    """cuDNN autotuning and channels-last VAE convs; optionally torch.compile DiT blocks and VAE decoder.

    Block shapes are fixed for a given resolution, so cuDNN's per-shape algorithm search and
    inductor's autotuning are paid once (first generation) and reused by every later block.
    fp8: the generator's block linears are FP8 (compiled without GEMM autotuning).
    Returns whether the models were compiled.
    """
    if components.generator.patch_embedding.weight.device.type != "cuda":
        return False
    accelerate_decoder(components.vae.model, compile_models)
    if compile_models:
        compile_generator(components.generator, fp8)
        log.info("torch.compile enabled for the generator blocks and VAE decoder (first generation compiles)")
    return compile_models


def compile_generator(generator: torch.nn.Module, fp8: bool = False) -> None:
    """torch.compile the generator blocks' static parts (a generator rank of its own runs it alone)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    generator.compile_blocks(options=FP8_BLOCK_COMPILE_OPTIONS if fp8 else BLOCK_COMPILE_OPTIONS, dynamic=False)


def accelerate_decoder(vae_model: torch.nn.Module, compile_models: bool) -> None:
    """accelerate()'s part for the VAE (on CUDA; a decoding rank of its own runs it alone)."""
    torch.backends.cudnn.benchmark = True
    vae_to_channels_last(vae_model)
    pad_vae_convs_in_kernel(vae_model)
    if compile_models:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # The decoder's many small norm/activation/pad/cat kernels fuse into few memory passes.
        make_upsamplers_traceable(vae_model)
        vae_model.decoder.compile(dynamic=False)


def vae_to_channels_last(model: torch.nn.Module) -> None:
    """Stores the 3D conv weights channels-last so cuDNN can pick its NDHWC kernels."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.to(memory_format=torch.channels_last_3d)


def pad_vae_convs_in_kernel(model: torch.nn.Module) -> None:
    """Lets the conv kernel zero-pad height and width instead of a separate F.pad copy of its input.

    Wan's causal convs pad all three axes with F.pad before an unpadded conv; only the time axis
    needs that (it is filled from the causal cache). Symmetric spatial zero padding inside the
    convolution is the same arithmetic without writing and re-reading a padded activation.
    """
    for module in model.modules():
        if isinstance(module, WanCausalConv3d):
            pad_w, _, pad_h, _, pad_t, _ = module._padding
            if pad_h or pad_w:
                module.padding = (0, pad_h, pad_w)
                module._padding = (0, 0, 0, 0, pad_t, 0)


def make_upsamplers_traceable(model: torch.nn.Module) -> None:
    """Gives each time-upsampling WanResample a forward that torch.compile traces as one graph.

    diffusers marks "first chunk, no time upsampling yet" by storing the string "Rep" in the conv
    cache and compares cached tensors with it (`tensor == "Rep"`). Some torch versions (2.11)
    cannot trace that comparison: the whole decoder falls back to per-module frames whose guards
    make the second generation recompile for ~35 s. The replacement tests the marker with
    isinstance and otherwise computes exactly what diffusers computes.
    """
    for module in model.modules():
        if isinstance(module, WanResample) and module.mode == "upsample3d":
            module.forward = types.MethodType(_upsample3d_forward, module)


def _upsample3d_forward(self: WanResample, x: torch.Tensor, feat_cache: list | None = None,
                        feat_idx: list[int] | None = None) -> torch.Tensor:
    batch, channels, frames, height, width = x.shape
    if feat_cache is not None and feat_idx is not None:
        index = feat_idx[0]
        feat_idx[0] += 1
        cached = feat_cache[index]
        if cached is None:
            feat_cache[index] = "Rep"  # the first latent frame decodes to a single video frame
        else:
            first_chunk = isinstance(cached, str)
            tail = x[:, :, -2:].clone()
            if tail.shape[2] < 2:
                previous = torch.zeros_like(tail) if first_chunk else cached[:, :, -1:]
                tail = torch.cat([previous, tail], dim=2)
            x = self.time_conv(x) if first_chunk else self.time_conv(x, cached)
            feat_cache[index] = tail
            x = x.reshape(batch, 2, channels, frames, height, width)
            x = torch.stack((x[:, 0], x[:, 1]), 3).reshape(batch, channels, frames * 2, height, width)
    frames = x.shape[2]
    x = self.resample(x.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width))
    return x.view(batch, frames, *x.shape[1:]).permute(0, 2, 1, 3, 4)
