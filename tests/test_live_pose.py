"""Live pose driving: a driving video that arrives frame by frame (a camera) conditions each block as it comes, with
the same tokens as the whole video (pipelines/pose/live.py), through DWPose or as a skeleton video."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from test_pose import FakeDetector

from pipelines.core import GenerationRequest, RequestError
from pipelines.loading.media import read_video
from pipelines.pose.animation import PoseAnimator
from pipelines.pose.condition import LazyPoseEncoders
from pipelines.video_input import LiveFrames

from conftest import ROOT

EXAMPLE = ROOT / "assets/examples/shapes/pose/an_orange_stick_figure_dances_on_a_dark_blue_background"


@pytest.fixture(scope="module")
def animator(tiny_pipeline) -> PoseAnimator:
    """The embedded model's own pose encoders (the pose tab's)."""
    encoders = LazyPoseEncoders(tiny_pipeline.generator.config.dim, tiny_pipeline.components.model_dir /
                                "pose_encoders.safetensors", "cpu", torch.float32)
    return PoseAnimator(tiny_pipeline, encoders, detector=FakeDetector())


def arriving(frames: list[np.ndarray], every_s: float = 0.002) -> LiveFrames:
    """A camera: the frames pushed one by one from another thread, then the feed closed."""
    live = LiveFrames(timeout_s=10)

    def send() -> None:
        for frame in frames:
            live.push(frame)
            time.sleep(every_s)
        live.close()

    threading.Thread(target=send, daemon=True).start()
    return live


def latents_of(pipeline, request) -> list[torch.Tensor]:
    return [r.latents for r in pipeline.generate(request) if r.complete]


@pytest.mark.parametrize("is_pose_video", [True, False])
def test_a_driving_video_arriving_frame_by_frame_equals_the_whole_video(tiny_pipeline, animator, is_pose_video):
    reference = Image.open(EXAMPLE.with_suffix(".png"))
    blocks = 3
    frames = read_video(EXAMPLE.with_suffix(".mp4"))[:4 * 3 * blocks - 3]  # 3 latent frames a block
    base = GenerationRequest("an orange stick figure dances on a dark blue background", seed=2, num_blocks=blocks,
                             height=64, width=96)
    whole = latents_of(tiny_pipeline, animator.request(reference, frames, is_pose_video, base))
    live = latents_of(tiny_pipeline, animator.live_request(reference, arriving(frames), is_pose_video, base))
    assert len(whole) == len(live) == blocks
    for index, (a, b) in enumerate(zip(whole, live)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), f"block {index}: {(a - b).abs().max()}"
    # Control: the same frames in another order drive another video.
    shuffled = [frames[i] for i in np.random.default_rng(0).permutation(len(frames))]
    other = latents_of(tiny_pipeline, animator.live_request(reference, arriving(shuffled), is_pose_video, base))
    assert not torch.allclose(other[-1], whole[-1], atol=1e-3)


def test_a_live_run_goes_on_while_frames_come_and_ends_with_them(tiny_pipeline, animator):
    """Asked for more blocks than the camera sends: the blocks whose frames arrived, then the end of the run."""
    reference = Image.open(EXAMPLE.with_suffix(".png"))
    frames = read_video(EXAMPLE.with_suffix(".mp4"))[:4 * 3 * 2 - 3 + 5]  # two blocks' frames, and a few more
    base = GenerationRequest("a figure dances", seed=1, num_blocks=6, height=64, width=96)
    results = [r for r in tiny_pipeline.generate(animator.live_request(reference, arriving(frames), True, base))
               if r.complete]
    assert [r.index for r in results] == [0, 1]


def test_a_camera_that_sends_nothing_is_refused_with_a_message(animator):
    silent = LiveFrames(timeout_s=0.2)
    with pytest.raises(RequestError, match="No frames came from the driving video or camera"):
        animator.live_request(Image.new("RGB", (96, 64)), silent, True,
                              GenerationRequest("x", num_blocks=2, height=64, width=96))
