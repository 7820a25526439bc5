"""Drift monitor: its statistics rise on a degrading stream and stay flat on a clean one; the guard re-caches a
continuous run when a block's drift passes its threshold, says so, and replays and branches like any run."""
from __future__ import annotations

import json

import numpy as np
import torch

from pipelines.core import GenerationRequest
from pipelines.drift import DriftMonitor
from pipelines.run_record import RunRecorder, replay_request

PROMPT = "a red circle moves to the right on a dark blue background"


def synthetic_block(index: int, degrade: float, rng: np.random.Generator) -> tuple[np.ndarray, torch.Tensor]:
    """12 frames of a textured dark-blue scene with a red square moving right; `degrade` (0..1) blurs the frames,
    washes their colours towards grey-yellow and inflates the latents."""
    frames = np.zeros((12, 64, 96, 3), dtype=np.float32)
    frames[..., 2] = 90 + rng.normal(0, 12, (12, 64, 96))
    for t in range(12):
        left = (index * 12 + t) % 70
        frames[t, 20:40, left:left + 20] = (200, 30, 30)
    if degrade:
        kernel = 1 + int(degrade * 10)
        for axis in (1, 2):  # (a box blur that widens as the stream degrades)
            frames = sum(np.roll(frames, shift, axis=axis) for shift in range(-kernel, kernel + 1)) / (2 * kernel + 1)
        frames = frames * (1 - degrade) + np.array([170, 160, 90], dtype=np.float32) * degrade
    latents = torch.from_numpy(rng.normal(0, 1 + 2 * degrade, (1, 16, 3, 8, 12)).astype(np.float32))
    return np.clip(frames, 0, 255).astype(np.uint8), latents


def scores(degrades: list[float]) -> list:
    monitor, rng = DriftMonitor(), np.random.default_rng(0)
    return [monitor.add(*synthetic_block(i, d, rng)) for i, d in enumerate(degrades)]


def test_drift_rises_on_a_degrading_stream_and_stays_flat_on_a_clean_one():
    clean = scores([0.0] * 12)
    assert max(d.score for d in clean) < 0.1 and min(d.similarity for d in clean) > 0.9
    degrading = scores([0.0, 0.0] + [i / 10 for i in range(1, 11)])
    values = [d.score for d in degrading]
    assert values[-1] > 0.6 and values[-1] > values[6] > values[2], values
    last = degrading[-1]
    assert last.sharpness < 0.5 * clean[-1].sharpness and last.similarity < 0.5 and last.latent_rms > 2
    assert last.saturation < clean[-1].saturation  # (washed out)


def _run(pipeline, request, blocks: int):
    results = []
    for result in pipeline.generate(request, cancel=lambda: len(results) >= blocks):
        if result.complete:
            results.append(result)
    return results


def test_the_guard_recaches_a_continuous_run_when_drift_passes_its_threshold(tiny_pipeline):
    unguarded = _run(tiny_pipeline, GenerationRequest(PROMPT, seed=1, continuous=True), 12)
    assert all(r.drift is not None for r in unguarded) and not any(r.refreshed for r in unguarded)
    threshold = sorted(r.drift.score for r in unguarded)[-4]  # (passed by a few blocks of this run)
    steering_free = GenerationRequest(PROMPT, seed=1, continuous=True, drift_guard=threshold)
    validated = tiny_pipeline.validate(steering_free)
    recorder, guarded = RunRecorder(tiny_pipeline, validated), []
    for result in tiny_pipeline.generate(validated, cancel=lambda: len(guarded) >= 12):
        recorder.add(result)
        if result.complete:
            guarded.append(result)
    refreshed = [i for i, r in enumerate(guarded) if r.refreshed]
    assert refreshed and all(guarded[i - 1].drift.score > threshold for i in refreshed)
    first = refreshed[0]
    # Up to the first re-cache the runs are the same; after it they differ.
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(guarded[:first], unguarded[:first]))
    assert not torch.equal(guarded[first].latents, unguarded[first].latents)
    record = json.loads(recorder.json())
    assert record["drift_guard"] == threshold and [b["refresh"] for b in record["blocks"]] == \
        [r.refreshed for r in guarded]
    assert set(record["blocks"][0]["drift"]) >= {"score", "similarity", "sharpness", "latent_rms", "brightness"}
    again = _run(tiny_pipeline, replay_request(record, tiny_pipeline), 12)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(guarded, again))


def test_a_recache_keeps_the_sink_frames_and_the_last_block(tiny_pipeline):
    from pipelines.core import BlockRun

    request = GenerationRequest(PROMPT, seed=2, continuous=True)
    validated = tiny_pipeline.validate(request)
    run = BlockRun(tiny_pipeline, validated, 0.0)
    for index in range(9):
        run.begin_block(index)
        clean, bias = run.denoise(index)
        run.write(clean, run.start_frame(index), 0.0, bias)
    end = run.caches[0].global_end
    run.refresh_cache()
    cache, tokens = run.caches[0], run.caches[0].frame_tokens
    assert [w.start_frame for w in run.written] == [0, 24]  # (the sink block and the last block)
    assert cache.global_end == end and cache.local_end == 6 * tokens
