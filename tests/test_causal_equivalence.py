"""KV-cached block generation must equal full-sequence forwards under a block-causal mask."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pipelines.core import GenerationRequest, StreamingVideoPipeline
from pipelines.model.kv_cache import AttentionWindow, KVCache, block_causal_mask

from streams import block_latents


def full_sequence_reference(pipeline: StreamingVideoPipeline, prompt: str, seed: int, num_blocks: int,
                            window: AttentionWindow) -> list[torch.Tensor]:
    """Few-step Self-Forcing sampling where every call is one full forward over all frames so far
    (clean past blocks at t=0, the current block noisy), masked block-causally. Same RNG draws."""
    model, schedule, cfg = pipeline.generator, pipeline.sampler.schedule, pipeline.config
    fpb = cfg.frames_per_block
    h, w = cfg.height // 8, cfg.width // 8
    context = model.encode_context(pipeline.prompt_encoder.encode(prompt))
    rng = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, num_blocks * fpb, 16, h, w), generator=rng).permute(0, 2, 1, 3, 4)
    tokens = model.frame_tokens(h, w)
    clean_blocks: list[torch.Tensor] = []
    steps = schedule.steps.tolist()
    for b in range(num_blocks):
        noisy = noise[:, :, b * fpb:(b + 1) * fpb]
        mask = block_causal_mask([fpb] * (b + 1), tokens, window)
        for i, t in enumerate(steps):
            latents = torch.cat(clean_blocks + [noisy], dim=2)
            times = torch.tensor([[0.0] * (b * fpb) + [t] * fpb])
            flow = model(latents, times, context, attn_mask=mask)[:, :, b * fpb:]
            clean = schedule.to_x0(flow, noisy, t)
            if i + 1 < len(steps):
                fresh = torch.randn(clean.permute(0, 2, 1, 3, 4).shape, generator=rng).permute(0, 2, 1, 3, 4)
                noisy = schedule.add_noise(clean, fresh, steps[i + 1])
        clean_blocks.append(clean)
    return clean_blocks


def _pipeline_with_window(base: StreamingVideoPipeline, window_frames: int, sink: int) -> StreamingVideoPipeline:
    config = dataclasses.replace(base.config, local_attn_size=window_frames, sink_size=sink)
    return StreamingVideoPipeline(base.components, config)


@pytest.mark.parametrize("window_frames,sink", [(-1, 0), (9, 3), (6, 1)])
def test_kv_cached_generation_equals_block_causal_full_forward(tiny_pipeline, window_frames, sink):
    pipeline = _pipeline_with_window(tiny_pipeline, window_frames, sink)
    num_blocks = 5
    cached = block_latents(pipeline.generate(GenerationRequest("a red fox", seed=3, num_blocks=num_blocks)))
    reference = full_sequence_reference(pipeline, "a red fox", 3, num_blocks, pipeline.window)
    assert len(cached) == num_blocks
    for b, (got, want) in enumerate(zip(cached, reference)):
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), f"block {b}: {(got - want).abs().max()}"


def test_rolling_window_changes_late_blocks_only(tiny_pipeline):
    """Control for the test above: a window that evicts must alter blocks that lost context."""
    full = block_latents(tiny_pipeline.generate(GenerationRequest("a red fox", seed=3, num_blocks=4)))
    rolled = block_latents(_pipeline_with_window(tiny_pipeline, 6, 0).generate(
        GenerationRequest("a red fox", seed=3, num_blocks=4)))
    assert torch.equal(full[0], rolled[0]) and torch.equal(full[1], rolled[1])
    assert not torch.allclose(full[3], rolled[3], atol=1e-4)


def test_block_at_start_frame_k_matches_full_forward_slice(tiny_pipeline):
    model = tiny_pipeline.generator
    torch.manual_seed(0)
    frames, k, fpb = 9, 6, 3
    latents = torch.randn(1, 16, frames, 8, 12)
    times = torch.rand(1, frames) * 1000
    context = model.encode_context(tiny_pipeline.prompt_encoder.encode("rope"))
    tokens = model.frame_tokens(8, 12)
    full = model(latents, times, context, attn_mask=block_causal_mask([fpb] * 3, tokens, AttentionWindow()))

    def cached_block(start_frame_for_rope: int) -> torch.Tensor:
        cache = KVCache(model.config.num_layers, 1, frames, tokens, model.config.num_heads, model.head_dim,
                        AttentionWindow(), torch.float32, "cpu")
        for s in range(0, k, fpb):
            model(latents[:, :, s:s + fpb], times[:, s:s + fpb], context, start_frame=s, kv_cache=cache)
        assert cache.local_end == k * tokens
        return _run_with_rope_offset(model, latents[:, :, k:], times[:, k:], context, cache, k, start_frame_for_rope)

    assert torch.allclose(cached_block(k), full[:, :, k:], atol=2e-5)
    assert not torch.allclose(cached_block(0), full[:, :, k:], atol=1e-3), "RoPE offset must matter"


def _run_with_rope_offset(model, block, times, context, cache, cache_frame, rope_frame):
    """Writes the block at cache_frame but rotates it as if it started at rope_frame."""
    original = model.rope.cos_sin
    model.rope.cos_sin = lambda f, h, w, start_frame, device: original(f, h, w, rope_frame, device)
    try:
        return model(block, times, context, start_frame=cache_frame, kv_cache=cache)
    finally:
        model.rope.cos_sin = original


def test_cache_rejects_overflow_without_rolling_window():
    cache = KVCache(1, 1, 3, 2, 1, 4, AttentionWindow(), torch.float32, "cpu")
    cache.begin(0, 6)
    cache.commit(0, 6)
    with pytest.raises(ValueError, match="full"):
        cache.begin(6, 2)
