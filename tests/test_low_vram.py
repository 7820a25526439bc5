"""Small-GPU options: the FP8 KV cache stays close to bf16, resident blocks stream exactly, and the
plan's choices reach the pipeline."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipelines.core import GenerationRequest, StreamingVideoPipeline
from pipelines.loading.weights import load_components
from pipelines.memory.planner import PLANNING_HEADROOM, PROFILES, apply_profile, configure_memory, footprint_of
from pipelines.model.fp8 import quantize_fp8
from pipelines.model.kv_cache import AttentionWindow, KVCache
from pipelines.settings import RuntimeSettings

from streams import block_latents


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_round_trip_error_is_bounded(dtype):
    torch.manual_seed(0)
    x = (torch.randn(2, 64, 4, 32) * torch.rand(2, 64, 4, 1) * 50).to(dtype)
    x[0, 0] = 0  # all-zero vectors must survive too
    values, scales = quantize_fp8(x)
    assert values.dtype == torch.float8_e4m3fn and scales.dtype == dtype
    assert torch.equal(torch.log2(scales.float()), torch.log2(scales.float()).round())  # powers of two
    restored = values.to(dtype) * scales
    error = (restored.float() - x.float()).abs()
    largest = x.float().abs().amax(-1, keepdim=True)
    # e4m3 keeps 3 mantissa bits: at most half a step (1/16) of each entry, or a sliver of the largest
    assert torch.all(error <= x.float().abs() / 16 + largest * 2.0 ** -16)
    assert error.max() > 0  # it really is quantised


def _cache(fp8: bool, window: AttentionWindow) -> KVCache:
    return KVCache(num_layers=2, batch=1, capacity_frames=12, frame_tokens=4, num_heads=2, head_dim=8,
                   window=window, dtype=torch.float32, device="cpu", fp8=fp8)


@pytest.mark.parametrize("window", [AttentionWindow(), AttentionWindow(6, 2)])
def test_fp8_cache_follows_the_bf16_cache_through_writes_and_evictions(window):
    """Same writes (denoising overwrites, appends, rolling evictions): the attended keys/values match
    the full-precision cache to FP8 precision, and the block being written is returned exactly."""
    torch.manual_seed(1)
    exact, fp8 = _cache(False, window), _cache(True, window)
    for block in range(4):
        start = block * 3 * 4
        for _step in range(2):  # a denoising step and the clean pass overwrite the same tokens
            k, v = torch.randn(1, 12, 2, 8), torch.randn(1, 12, 2, 8)
            for cache in (exact, fp8):
                cache.begin(start, 12)
            for layer in range(2):
                want_k, want_v = exact.update(layer, k, v)
                got_k, got_v = fp8.update(layer, k, v)
                assert got_k.shape == want_k.shape
                assert torch.equal(got_k[:, -12:], k) and torch.equal(got_v[:, -12:], v)
                for got, want in ((got_k, want_k), (got_v, want_v)):
                    assert torch.all((got - want).abs() <= want.abs() / 16 + 1e-6)
            for cache in (exact, fp8):
                cache.commit(start, 12)
    assert fp8.keys.dtype == torch.float8_e4m3fn
    assert fp8.keys.element_size() * 4 == exact.keys.element_size()


def _run(pipeline: StreamingVideoPipeline, **request):
    return list(pipeline.generate(GenerationRequest("a red kite over the sea", seed=5, num_blocks=3, **request)))


def test_generation_with_the_fp8_cache_is_close_to_bf16(tiny_components, tiny_config):
    base = StreamingVideoPipeline(tiny_components, tiny_config)
    quantised = StreamingVideoPipeline(tiny_components, tiny_config, settings=RuntimeSettings(kv_cache_fp8=True))
    want, got = block_latents(_run(base)), block_latents(_run(quantised))
    assert torch.equal(got[0], want[0])  # the first block attends only to itself: never quantised
    errors = [((g - w).norm() / w.norm()).item() for g, w in zip(got[1:], want[1:])]
    assert all(0 < e < 0.05 for e in errors), errors


def test_resident_blocks_stream_exactly_and_keep_lora_merges(tiny_components, tiny_config):
    fresh = load_components(tiny_config)
    apply_profile(fresh, PROFILES["low"], "cpu", resident_blocks=1)
    streamer = fresh.generator.weight_streamer
    assert streamer.resident == 1 and streamer.masters[0] is None and not fresh.generator.blocks[0]._forward_pre_hooks
    base = StreamingVideoPipeline(tiny_components, tiny_config)
    streamed = StreamingVideoPipeline(fresh, tiny_config)
    np.testing.assert_array_equal(np.concatenate([r.frames for r in _run(streamed)]),
                                  np.concatenate([r.frames for r in _run(base)]))
    weight = fresh.generator.blocks[0].attn1.to_q.weight
    weight.data += 1.0  # as an in-place LoRA merge does
    expected = weight.detach().clone()
    apply_profile(fresh, PROFILES["high"], "cpu")
    assert torch.equal(fresh.generator.blocks[0].attn1.to_q.weight, expected)


def test_configure_memory_returns_the_plans_settings(tiny_config):
    """A budget just large enough for the FP8 cache with the streamed profile: a pipeline built with the
    settings the planner returns runs with every low-VRAM option the plan chose, and says so."""
    components = load_components(tiny_config)
    latent_h, latent_w = tiny_config.latent_size()
    footprint = footprint_of(components, components.generator.frame_tokens(latent_h, latent_w),
                             tiny_config.height * tiny_config.width)
    frames = tiny_config.num_blocks * tiny_config.frames_per_block + 1
    budget = footprint.fixed_bytes(PROFILES["low"], True) + footprint.kv_bytes(frames, True) + PLANNING_HEADROOM
    # (the 2-block tiny model fits "medium" just as well)
    plan, settings = configure_memory(components, tiny_config, "cpu", "low", budget)
    assert (plan.profile.name, plan.kv_fp8, plan.decode_frame_by_frame, plan.window_forced) == ("low", True, True,
                                                                                                 False)
    assert settings.kv_cache_fp8 and settings.decode_frame_by_frame
    pipeline = StreamingVideoPipeline(components, tiny_config, settings=settings)
    results = _run(pipeline)
    assert not results[0].window_forced and len(block_latents(results)) == 3
    smaller, settings = configure_memory(components, tiny_config, "cpu", "low", budget - footprint.kv_bytes(6, True),
                                         settings=settings)
    assert smaller.window_forced and smaller.kv_fp8
    assert _run(pipeline.with_settings(settings))[0].window_frames == smaller.window_frames
    _, settings = configure_memory(components, tiny_config, "cpu", "auto", 1 << 50, settings=settings)
    assert not settings.kv_cache_fp8 and not settings.decode_frame_by_frame


def test_fp8_with_a_rolling_window_stays_close_to_bf16(random_components, random_config):
    """Evictions and re-quantisation while the window rolls twice. On seeded random weights: the trained
    model's sampler turns a 3 % difference in one block into a shape edge a latent pixel away a few
    blocks later (up to 18 % relative difference by the fifth block), which says nothing about the cache."""
    rolled = dataclasses.replace(random_config, local_attn_size=6, sink_size=3)
    base = StreamingVideoPipeline(random_components, rolled)
    quantised = StreamingVideoPipeline(random_components, rolled, settings=RuntimeSettings(kv_cache_fp8=True))
    request = GenerationRequest("waves", seed=2, num_blocks=5)
    want, got = block_latents(base.generate(request)), block_latents(quantised.generate(request))
    errors = [((g - w).norm() / w.norm()).item() for g, w in zip(got, want)]
    assert errors[0] == 0 and all(0 < e < 0.005 for e in errors[1:]), errors
