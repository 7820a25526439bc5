"""Prompt switching mid-stream on the tiny model: plain switch and KV re-cache."""
from __future__ import annotations

import pytest
import torch

from pipelines.core import GenerationRequest, StreamingVideoPipeline, prepare_image
from pipelines.steering import PromptSteering

from streams import block_latents


def _run(pipeline, switch_after: int | None = None, new_prompt: str = "a blue whale", mode: str = "recache",
         blocks: int = 4, **request):
    """Blocks of a run that posts a switch once block `switch_after` (1-based) has arrived."""
    steering = PromptSteering()
    results = []
    for result in pipeline.generate(GenerationRequest("a red fox", seed=11, num_blocks=blocks, steering=steering,
                                                      **request)):
        results.append(result)
        if result.complete and result.index + 1 == switch_after:
            steering.post(new_prompt, mode)
    return results


@pytest.mark.parametrize("mode", ["recache", "plain"])
def test_blocks_before_the_switch_are_unchanged_and_later_ones_follow_the_new_prompt(tiny_pipeline, mode):
    plain_run = block_latents(_run(tiny_pipeline))
    switched = _run(tiny_pipeline, switch_after=2, mode=mode)
    latents = block_latents(switched)
    assert all(torch.equal(a, b) for a, b in zip(latents[:2], plain_run[:2]))
    assert not torch.equal(latents[2], plain_run[2])
    complete = [r for r in switched if r.complete]
    assert [r.prompt for r in complete] == ["a red fox"] * 2 + ["a blue whale"] * 2
    assert complete[2].switch_ms is not None and complete[2].switch_ms >= 0
    assert complete[1].switch_ms is None and complete[3].switch_ms is None


def test_switching_to_the_same_prompt_changes_nothing(tiny_pipeline):
    reference = block_latents(_run(tiny_pipeline))
    same = _run(tiny_pipeline, switch_after=1, new_prompt="a red fox")
    assert all(torch.equal(a, b) for a, b in zip(block_latents(same), reference))
    assert all(r.switch_ms is None for r in same)


def test_recache_differs_from_plain_switch(tiny_pipeline):
    recached = block_latents(_run(tiny_pipeline, switch_after=1, mode="recache"))
    plain = block_latents(_run(tiny_pipeline, switch_after=1, mode="plain"))
    assert torch.equal(recached[0], plain[0]) and not torch.equal(recached[1], plain[1])


class _CacheSpy(StreamingVideoPipeline):
    """Records the caches the core builds when it re-caches, and the caches it hands to blocks."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.rebuilt = []

    def rebuilt_cache(self, cache, context, written):
        fresh = super().rebuilt_cache(cache, context, written)
        self.rebuilt.append((fresh, context))
        return fresh


@pytest.mark.parametrize("image", [False, True])
def test_recache_equals_a_fresh_prefill_of_the_clean_frames_under_the_new_prompt(tiny_components, tiny_config, image):
    from PIL import Image

    spy = _CacheSpy(tiny_components, tiny_config)
    extra = {"image": Image.new("RGB", (96, 64), (40, 160, 90))} if image else {}
    results = _run(spy, switch_after=2, blocks=3, **extra)
    assert len(spy.rebuilt) == 1
    cache, _ = spy.rebuilt[0]
    model = spy.generator
    context = model.encode_context(spy.prompt_encoder.encode("a blue whale"))
    clean = [r.latents for r in results if r.complete][:2]
    prefix = [spy.vae.encode(prepare_image(extra["image"], 64, 96))] if image else []
    fresh = cache.empty_like()
    start = 0
    with torch.no_grad():
        for latents in prefix + clean:
            model(latents, torch.zeros(1, latents.shape[2]), context, start_frame=start, kv_cache=fresh)
            start += latents.shape[2]
    end = fresh.local_end  # (the run's cache has grown since: block 3 was appended after the switch)
    assert 0 < end < cache.local_end
    assert torch.allclose(cache.keys[:, :, :end], fresh.keys[:, :, :end], atol=1e-5)
    assert torch.allclose(cache.values[:, :, :end], fresh.values[:, :, :end], atol=1e-5)


def test_rolling_window_recache_keeps_the_window(tiny_pipeline):
    import dataclasses

    rolled = StreamingVideoPipeline(tiny_pipeline.components, dataclasses.replace(tiny_pipeline.config,
                                                                                  local_attn_size=6, sink_size=3))
    results = _run(rolled, switch_after=3, blocks=5)
    assert [r.prompt for r in results if r.complete][-1] == "a blue whale"


def test_steering_refuses_bad_switches():
    steering = PromptSteering()
    with pytest.raises(ValueError, match="recache, plain"):
        steering.post("x", "sideways")
    with pytest.raises(ValueError, match="enter a prompt"):
        steering.post("  ")
    steering.post("first")
    steering.post("second", "plain")
    taken = steering.take()
    assert (taken.prompt, taken.mode) == ("second", "plain") and steering.take() is None


def test_a_switch_on_the_embedded_model_draws_the_new_prompt(tiny_pipeline, tiny_config):
    """Scored by the synthetic world's evaluator: after a recache switch following block 2 of 6, the blocks from the
    second one after the switch show the new prompt's shape moving its way; the run without a switch does not
    (control). The page starts with 6 blocks (configs/tiny.yaml `demo.blocks`) so a switch has room to show."""
    import numpy as np

    from training.evaluate import score_video

    first = "a red circle moves to the right on a dark blue background"
    second = "a yellow star moves down on a black background"
    assert tiny_config.demo.blocks == 6

    def later_blocks(seed: int, switch: bool) -> np.ndarray:
        steering = PromptSteering()
        frames = []
        for result in tiny_pipeline.generate(GenerationRequest(first, seed=seed, num_blocks=6, steering=steering)):
            frames.append((result.index, result.frames))
            if switch and result.index == 1 and result.complete:
                steering.post(second, "recache")
        return np.concatenate([f for index, f in frames if index >= 3])

    switched = [score_video(later_blocks(seed, True), second, "yellow", "down") for seed in range(3)]
    assert sum(s.found and s.direction_ok for s in switched) >= 2, switched
    assert not any(score_video(later_blocks(seed, False), second, "yellow", "down").found for seed in range(3))
