"""Video-to-video on the tiny model: each block's input frames are encoded by the streaming VAE encoder, noised to the
strength and denoised under the prompt. Low strength keeps the input's colours and motion (the project's shape
evaluator), strength 1 is text-to-video; a live feed arriving frame by frame gives the latents of the whole file."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from pipelines.core import GenerationRequest, RequestError
from pipelines.video_input import FrameList, LiveFrames
from training.evaluate import score_video
from training.synthetic import SyntheticWorld, render

WORLD = SyntheticWorld(0, frames=33)


def _scenes(count: int):
    """(input scene, the other scene whose caption is the prompt) pairs at the model's size."""
    return [(WORLD.held_out_scene(i, size=(64, 96)), WORLD.held_out_scene(50 + i, size=(64, 96))) for i in range(count)]


def _results(pipeline, request):
    return list(pipeline.generate(request))


def test_the_streaming_encoder_equals_a_one_shot_encode(tiny_components):
    pixels = torch.rand(1, 3, 21, 64, 96) * 2 - 1
    encoder = tiny_components.vae.stream_encoder()
    streamed = torch.cat([encoder.encode_frames(pixels[:, :, :9]), encoder.encode_frames(pixels[:, :, 9:21])], dim=2)
    assert torch.equal(streamed, tiny_components.vae.encode(pixels))
    with pytest.raises(ValueError, match="1 \\+ 4k frames first"):
        tiny_components.vae.stream_encoder().encode_frames(pixels[:, :, :4])


def test_low_strength_keeps_the_input_and_full_strength_is_text_to_video(tiny_pipeline):
    kept = 0
    for index, (scene, other) in enumerate(_scenes(4)):
        spec = scene.shapes[0]
        request = GenerationRequest(other.caption, seed=index, source=FrameList(render(scene)), strength=0.3)
        frames = np.concatenate([r.frames for r in _results(tiny_pipeline, request)])
        assert len(frames) == 33  # (3 blocks: the whole input)
        score = score_video(frames, scene.caption, spec.colour, spec.motion)
        kept += score.found and score.direction_ok
    assert kept == 4
    # Strength 1: the input is all noise, so the run is the prompt's text-to-video (same seed, same latents).
    scene, other = _scenes(1)[0]
    full = [r.latents for r in _results(tiny_pipeline, GenerationRequest(
        other.caption, seed=3, source=FrameList(render(scene)), strength=1.0)) if r.complete]
    text = [r.latents for r in _results(tiny_pipeline, GenerationRequest(other.caption, seed=3, num_blocks=3))
            if r.complete]
    assert all(torch.equal(a, b) for a, b in zip(full, text)) and len(full) == 3
    # Control: at 0.3 the input shows through, so the latents are not text-to-video's.
    low = [r.latents for r in _results(tiny_pipeline, GenerationRequest(
        other.caption, seed=3, source=FrameList(render(scene)), strength=0.3)) if r.complete]
    assert not torch.allclose(low[1], text[1], atol=1e-2)


def test_a_live_feed_gives_the_latents_of_the_whole_file(tiny_pipeline):
    scene, other = _scenes(1)[0]
    frames = render(scene)
    whole = [r.latents for r in _results(tiny_pipeline, GenerationRequest(
        other.caption, seed=2, source=FrameList(frames), strength=0.5)) if r.complete]

    def camera(count: int) -> LiveFrames:  # (frames arrive one by one while the run waits for them)
        live = LiveFrames(timeout_s=5)

        def push() -> None:
            for frame in frames[:count]:
                live.push(frame)
            live.close()
        threading.Thread(target=push, daemon=True).start()
        return live

    streamed = [r.latents for r in _results(tiny_pipeline, GenerationRequest(
        other.caption, seed=2, source=camera(33), strength=0.5, num_blocks=3)) if r.complete]
    assert len(streamed) == len(whole) == 3
    assert all(torch.equal(a, b) for a, b in zip(streamed, whole))
    # A feed that stops ends the run after its last whole block.
    cut = [r for r in _results(tiny_pipeline, GenerationRequest(
        other.caption, seed=2, source=camera(25), strength=0.5, num_blocks=3)) if r.complete]
    assert len(cut) == 2 and torch.equal(cut[1].latents, whole[1])


def test_bad_video_to_video_requests_are_refused(tiny_pipeline):
    frames = render(_scenes(1)[0][0])
    with pytest.raises(RequestError, match="too short: it needs at least 9 frames"):
        tiny_pipeline.validate(GenerationRequest("x", source=FrameList(frames[:5])))
    with pytest.raises(RequestError, match="Strength must be above 0"):
        tiny_pipeline.validate(GenerationRequest("x", source=FrameList(frames), strength=0))
    assert tiny_pipeline.validate(GenerationRequest("x", source=FrameList(frames[:21]))).num_blocks == 2


def test_a_live_camera_that_runs_ahead_of_the_model_gives_each_block_its_newest_frames():
    """A run slower than its camera skips the stale frames (keep_up), so the delay to the screen does not grow;
    a plain live feed (a pushed video that must arrive whole) keeps every frame."""
    frames = [np.full((4, 4, 3), value, dtype=np.uint8) for value in range(30)]
    for keep_up, first in ((True, 18), (False, 0)):
        live = LiveFrames(timeout_s=1, keep_up=keep_up)
        for frame in frames:
            live.push(frame)
        block = live.read(12)
        assert [int(f[0, 0, 0]) for f in block] == list(range(first, first + 12))
        assert live.skipped == (18 if keep_up else 0)
    live = LiveFrames(timeout_s=1, keep_up=True)
    for frame in frames[:20]:
        live.push(frame)
    live.close()
    assert live.read(12) is None  # (the feed closed while the run was behind: the run ends)


def test_the_camera_drives_a_live_run_until_stop_and_a_silent_camera_ends_it(tiny_pipeline, tiny_config):
    import time

    from demo.handlers import Handlers

    from runtimes import local_runtime

    handlers = Handlers(local_runtime(tiny_config, tiny_pipeline))
    frames = render(_scenes(1)[0][0])

    def visitor(stop_after: int | None):
        session = handlers.runtime.new_session()
        session.CAMERA_TIMEOUT_S = 1.0

        def camera() -> None:  # (the page's camera stream: frames at about the model's rate, then silence)
            while session.camera is None:
                time.sleep(0.01)
            feeds.append(session.camera)
            for index, frame in enumerate(frames):
                session.camera_frame(frame)
                if stop_after is not None and index == stop_after:
                    handlers.request_stop(session)
                time.sleep(1 / 16)  # (a camera keeping pace: a faster one would have its stale frames skipped)

        threading.Thread(target=camera, daemon=True).start()
        return list(handlers.video_to_video(None, 0.3, True, "a green square moves up on a black background", "", 3,
                                            False, 4, 16, "96x64", False, "", None, 1.0, False, False, 0.0, session,
                                            None)), session

    feeds = []
    updates, session = visitor(None)
    assert "**The camera stopped sending frames**" in updates[-1][2]
    made = session.runs.runs[1].made
    used = tiny_config.block_video_frames(0) + (made - 1) * tiny_config.block_video_frames(1)
    # every frame the camera sent went into a block, or was skipped by a run behind it, or is less than a block
    assert made >= 1 and 0 <= len(frames) - used - feeds[0].skipped < tiny_config.block_video_frames(1)
    updates, _ = visitor(20)  # (Stop while the camera streams: the run ends at once, its video kept)
    assert updates[-1][2].startswith("Stopped.") and updates[-1][3]
