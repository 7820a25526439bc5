"""Low-VRAM mode: weight streaming is exact, profiles follow free memory, weights go home."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipelines.core import GenerationRequest, StreamingVideoPipeline
from pipelines.loading.weights import load_components
from pipelines.memory.planner import (
    FRAME_BY_FRAME_DECODE_SHARE,
    GIB,
    PLANNING_HEADROOM,
    PROFILES,
    ModelFootprint,
    activation_bytes,
    apply_profile,
    decode_working_set_bytes,
    footprint_of,
    plan_memory,
)
from pipelines.model.kv_cache import kv_bytes_per_frame
from pipelines.settings import RuntimeSettings

from streams import block_latents


@pytest.fixture()
def fresh_components(tiny_config):
    return load_components(tiny_config)


def _video(components, config, **request):
    pipeline = StreamingVideoPipeline(components, config)
    return np.concatenate([r.frames for r in pipeline.generate(GenerationRequest("a windmill", seed=9, **request))])


@pytest.mark.parametrize("profile", ["medium", "low"])
def test_streamed_weights_give_bit_identical_video(fresh_components, tiny_config, tiny_components, profile):
    resident = _video(tiny_components, tiny_config, num_blocks=3)
    apply_profile(fresh_components, PROFILES[profile], "cpu")
    assert (fresh_components.generator.weight_streamer is not None) == (profile == "low")
    assert fresh_components.prompt_encoder.model.weight_streamer is not None
    np.testing.assert_array_equal(_video(fresh_components, tiny_config, num_blocks=3), resident)
    i2v = dict(num_blocks=2, image=__import__("PIL.Image").Image.new("RGB", (96, 64), (200, 30, 30)))
    np.testing.assert_array_equal(_video(fresh_components, tiny_config, **i2v), _video(tiny_components, tiny_config, **i2v))


def test_weights_return_to_their_cpu_masters_after_a_run(fresh_components, tiny_config):
    apply_profile(fresh_components, PROFILES["low"], "cpu")
    streamer = fresh_components.generator.weight_streamer
    before = [[p.data_ptr() for p in block.parameters()] for block in fresh_components.generator.blocks]
    _video(fresh_components, tiny_config, num_blocks=2)
    after = [[p.data_ptr() for p in block.parameters()] for block in fresh_components.generator.blocks]
    masters = [[t.data_ptr() for t in tensors] for tensors in streamer.masters]
    assert before == after == masters
    slot_ptrs = {t.data_ptr() for slot in streamer.slots for t in slot}
    assert not slot_ptrs & {p for block in after for p in block}


def test_switching_back_to_high_restores_plain_modules(fresh_components, tiny_config, tiny_components):
    apply_profile(fresh_components, PROFILES["low"], "cpu")
    apply_profile(fresh_components, PROFILES["high"], "cpu")
    assert fresh_components.generator.weight_streamer is None
    assert not fresh_components.generator.blocks[0]._forward_pre_hooks
    np.testing.assert_array_equal(_video(fresh_components, tiny_config, num_blocks=1),
                                  _video(tiny_components, tiny_config, num_blocks=1))


# Sizes of the real model in bf16 (measured from the modules; see bench/results/h100_memory_*.json).
_PIXELS = 832 * 480
REAL = ModelFootprint(generator_bytes=int(2.64 * GIB), generator_block_bytes=int(0.085 * GIB), generator_blocks=30,
                      text_encoder_bytes=int(10.6 * GIB), vae_bytes=int(0.24 * GIB),
                      kv_bytes_per_frame=kv_bytes_per_frame(30, 1536, 1560, torch.bfloat16),
                      activation_bytes=activation_bytes(1560, 8960, 480 * 832, 2),
                      kv_fp8_bytes_per_frame=kv_bytes_per_frame(30, 1536, 1560, torch.bfloat16, fp8_heads=12),
                      decode_frame_by_frame_saving=int(decode_working_set_bytes(_PIXELS, 2, False)
                                                       * (1 - FRAME_BY_FRAME_DECODE_SHARE)))


# card -> (profile, frame-by-frame decode, FP8 KV cache, rolling window forced)
PLANS = {80: ("high", False, False, False), 24: ("medium", False, False, False), 16: ("medium", False, False, False),
         12: ("low", True, False, False), 8: ("low", True, True, False), 6: ("low", True, True, True)}


@pytest.mark.parametrize("free_gib", sorted(PLANS, reverse=True))
def test_plan_follows_free_memory(free_gib):
    """Exact options first (medium, frame-by-frame decode, streamed blocks), then FP8, then a window."""
    plan = plan_memory(REAL, int(free_gib * GIB), latent_frames=21, frames_per_block=3)
    assert (plan.profile.name, plan.decode_frame_by_frame, plan.kv_fp8, plan.window_forced) == PLANS[free_gib]
    assert plan.fits and plan.estimated_peak_bytes <= free_gib * GIB - PLANNING_HEADROOM
    if free_gib == 12:  # nearly every generator block stays resident: close to medium's speed
        assert plan.resident_blocks >= 20
    summary = plan.summary()
    assert ("FP8" in summary) == plan.kv_fp8 and ("rolling attention window" in summary) == plan.window_forced
    assert ("Same video as on a large GPU" in summary) == (not plan.changes_video)
    if plan.window_forced:
        assert plan.window_frames % 3 == 0 and 6 <= plan.window_frames < 21
    if plan.profile.stream_generator and not plan.window_forced:  # memory left after the cache keeps blocks resident
        spare = free_gib * GIB - (plan.estimated_peak_bytes - plan.resident_blocks * REAL.generator_block_bytes)
        assert plan.resident_blocks == min(28, max(0, spare - PLANNING_HEADROOM) // REAL.generator_block_bytes)
    assert plan.resident_blocks == 0 or plan.profile.stream_generator


def test_eight_gib_keeps_full_attention_and_resident_blocks():
    plan = plan_memory(REAL, 8 * GIB, latent_frames=21, frames_per_block=3)
    assert plan.window_frames is None and plan.resident_blocks >= 3
    assert f"{plan.resident_blocks} generator blocks kept resident" in plan.summary()


def test_kv_cache_choice_is_respected():
    bf16 = plan_memory(REAL, 8 * GIB, 21, 3, kv_cache="bf16")
    assert not bf16.kv_fp8 and bf16.window_forced  # without FP8, 8 GiB needs a window
    assert plan_memory(REAL, 80 * GIB, 21, 3, kv_cache="fp8").kv_fp8
    with pytest.raises(ValueError):
        plan_memory(REAL, 80 * GIB, 21, 3, kv_cache="int4")


def test_nothing_fits_warns():
    plan = plan_memory(REAL, 4 * GIB, 21, 3)
    assert not plan.fits and plan.window_frames == 6 and "WARNING" in plan.summary()


def test_requested_profile_overrides_auto():
    plan = plan_memory(REAL, 80 * GIB, 21, 3, requested="low")
    assert plan.profile.name == "low" and not plan.window_forced and not plan.kv_fp8
    assert plan.resident_blocks == 28  # everything but the two streaming slots
    with pytest.raises(ValueError):
        plan_memory(REAL, 80 * GIB, 21, 3, requested="tiny")


def _kv_bytes_per_frame(config) -> int:
    """24 tokens per latent frame at 96x64, a key and a value per layer, float32."""
    return 24 * 2 * config.model["num_layers"] * config.model["dim"] * 4


def test_footprint_measures_loaded_modules(tiny_components, tiny_config):
    fp = footprint_of(tiny_components, frame_tokens=24, pixels=64 * 96)
    layers = tiny_config.model["num_layers"]
    assert fp.generator_blocks == layers and fp.text_encoder_bytes > 0
    assert fp.generator_block_bytes * layers < fp.generator_bytes
    assert fp.kv_bytes_per_frame == _kv_bytes_per_frame(tiny_config)


def test_kv_budget_narrows_attention_window(tiny_pipeline, tiny_config, tiny_components):
    per_frame = _kv_bytes_per_frame(tiny_config)
    pipeline = StreamingVideoPipeline(tiny_components, tiny_config, settings=RuntimeSettings(kv_cache_budget=7 * per_frame))
    results = list(pipeline.generate(GenerationRequest("x", seed=1, num_blocks=4)))
    assert results[0].window_frames == 6 and results[0].window_forced
    rolled = dataclasses.replace(tiny_config, local_attn_size=6)
    expected = block_latents(StreamingVideoPipeline(tiny_components, rolled).generate(
        GenerationRequest("x", seed=1, num_blocks=4)))
    assert all(torch.equal(a, b) for a, b in zip(block_latents(results), expected))
    pipeline = pipeline.with_settings(RuntimeSettings(kv_cache_budget=100 * per_frame))
    assert not next(pipeline.generate(GenerationRequest("x", num_blocks=4))).window_forced


def test_compiled_decoder_memory_is_planned_for():
    """--compile raised the H100 peak by 5.9 GiB at 832x480; a 26 GiB card must then leave the high profile."""
    pixels = 832 * 480
    extra = decode_working_set_bytes(pixels, 2, compiled=True) - decode_working_set_bytes(pixels, 2, compiled=False)
    assert 5.5 * GIB < extra < 6.5 * GIB
    compiled = dataclasses.replace(REAL, activation_bytes=REAL.activation_bytes + extra)
    assert plan_memory(REAL, 26 * GIB, latent_frames=21, frames_per_block=3).profile.name == "high"
    assert plan_memory(compiled, 26 * GIB, latent_frames=21, frames_per_block=3).profile.name == "medium"
    assert plan_memory(compiled, 40 * GIB, latent_frames=21, frames_per_block=3).profile.name == "high"


def test_footprint_grows_when_compiled(tiny_components):
    eager = footprint_of(tiny_components, frame_tokens=24, pixels=64 * 96)
    compiled = footprint_of(tiny_components, frame_tokens=24, pixels=64 * 96, compiled=True)
    assert compiled.activation_bytes > eager.activation_bytes
    assert compiled.decode_frame_by_frame_saving > eager.decode_frame_by_frame_saving  # (it runs eagerly)
    assert dataclasses.replace(compiled, activation_bytes=eager.activation_bytes,
                               decode_frame_by_frame_saving=eager.decode_frame_by_frame_saving) == eager
