"""Pose animation: drawing, alignment, per-block conditioning, lazy weights, extraction paths."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.core import GenerationRequest
from pipelines.loading.media import MediaError, read_video
from pipelines.loading.vae import frames_for_latents
from pipelines.loading.weights import WeightsError
from pipelines.model.kv_cache import AttentionWindow, KVCache, block_causal_mask
from pipelines.pose.align import align_sequence, alignment_transform, resample_indices
from pipelines.pose.animation import PoseAnimator
from pipelines.pose.condition import LazyPoseEncoders, PoseConditioning
from pipelines.pose.draw import BODY_COLORS, PoseFrame, draw_pose
from pipelines.pose.extract import DETECTOR_FILE, POSE_FILE, decode_simcc, decode_yolox, load_dwpose, wholebody_to_pose


def body(points: dict[int, tuple[float, float]]) -> np.ndarray:
    array = np.zeros((18, 3))
    for index, (x, y) in points.items():
        array[index] = (x, y, 1.0)
    return array


def test_drawing_puts_joint_and_limb_colours_where_the_keypoints_are():
    frame = PoseFrame(bodies=[body({1: (0.25, 0.5), 2: (0.75, 0.5)})],
                      hands=[np.array([[0.5, 0.1, 1.0]] + [[0, 0, 0]] * 20)],
                      faces=[np.array([[0.9, 0.9, 1.0]] + [[0, 0, 0]] * 67)])
    image = draw_pose(frame, 200, 100)
    assert image.shape == (100, 200, 3) and image.dtype == np.uint8
    assert tuple(image[50, 50]) == BODY_COLORS[1]  # neck joint
    assert tuple(image[50, 150]) == BODY_COLORS[2]  # right shoulder joint
    assert tuple(image[50, 100]) == tuple(int(c * 0.6) for c in BODY_COLORS[0])  # neck-shoulder limb
    assert tuple(image[10, 100]) == (0, 0, 255)  # hand point
    assert tuple(image[90, 180]) == (255, 255, 255)  # face point
    assert tuple(image[5, 5]) == (0, 0, 0)
    assert tuple(draw_pose(PoseFrame(bodies=[body({1: (0.25, 0.5)})]), 200, 100)[50, 100]) == (0, 0, 0)


def test_alignment_maps_first_driving_body_onto_reference():
    reference = PoseFrame(bodies=[body({0: (0.5, 0.2), 1: (0.5, 0.3), 8: (0.45, 0.6), 11: (0.55, 0.6)})])
    driving = [PoseFrame(bodies=[body({0: (0.1, 0.1), 1: (0.1, 0.15), 8: (0.075, 0.3), 11: (0.125, 0.3)})]),
               PoseFrame(bodies=[body({0: (0.2, 0.1), 1: (0.2, 0.15), 8: (0.175, 0.3), 11: (0.225, 0.3)})])]
    scale, offset = alignment_transform(driving[0], reference)
    np.testing.assert_allclose(scale, [2.0, 2.0])
    aligned = align_sequence(driving, reference)
    np.testing.assert_allclose(aligned[0].bodies[0][[0, 1, 8, 11], :2], reference.bodies[0][[0, 1, 8, 11], :2])
    np.testing.assert_allclose(aligned[1].bodies[0][0, :2] - aligned[0].bodies[0][0, :2], [0.2, 0.0])  # motion kept
    lonely = PoseFrame(bodies=[body({0: (0.3, 0.3)})])
    assert alignment_transform(lonely, reference)[0].tolist() == [1.0, 1.0]


def test_resampling_to_model_frame_count():
    assert resample_indices(5, 9) == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert resample_indices(100, 3) == [0, 50, 99]
    assert frames_for_latents(21) == 81  # pose frames per latent run: Wan's 4n - 3
    with pytest.raises(ValueError, match="no frames"):
        resample_indices(0, 9)


def test_per_block_pose_tokens_equal_full_sequence_conditioning(tiny_pipeline):
    model = tiny_pipeline.generator
    encoders = LazyPoseEncoders(model.config.dim, None, "cpu", torch.float32, random_seed=1).get()
    rng = np.random.default_rng(0)
    pose_video = rng.integers(0, 255, (frames_for_latents(6), 64, 96, 3), dtype=np.uint8)
    tokens = encoders.pose_tokens(pose_video)
    frame_tokens = model.frame_tokens(8, 12)
    assert tokens.shape == (1, 6 * frame_tokens, model.config.dim)
    conditioning = PoseConditioning(tokens, frame_tokens, prefix_frames=1)
    context = model.encode_context(tiny_pipeline.prompt_encoder.encode("dance"))
    latents, times = torch.randn(1, 16, 7, 8, 12), torch.rand(1, 7) * 1000
    full_bias = torch.cat([torch.zeros(1, frame_tokens, model.config.dim), tokens], dim=1)
    mask = block_causal_mask([1, 3, 3], frame_tokens, AttentionWindow())
    full = model(latents, times, context, attn_mask=mask, token_bias=full_bias)
    cache = KVCache(model.config.num_layers, 1, 7, frame_tokens, model.config.num_heads, model.head_dim,
                    AttentionWindow(), torch.float32, "cpu")
    outputs = []
    for start, frames in ((0, 1), (1, 3), (4, 3)):
        outputs.append(model(latents[:, :, start:start + frames], times[:, start:start + frames], context,
                             start_frame=start, kv_cache=cache, token_bias=conditioning.token_bias(start, frames)))
    assert torch.allclose(torch.cat(outputs, dim=2), full, atol=2e-5)
    assert conditioning.token_bias(0, 1) is None
    with pytest.raises(ValueError):
        conditioning.token_bias(6, 3)
    assert not torch.allclose(model(latents, times, context, attn_mask=mask), full, atol=1e-3), "pose must matter"


def test_pose_encoders_load_lazily_and_once(tmp_path):
    lazy = LazyPoseEncoders(64, None, "cpu", torch.float32, random_seed=0)
    assert lazy.loads == 0
    results = []
    threads = [threading.Thread(target=lambda: results.append(lazy.get())) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert lazy.loads == 1 and all(r is results[0] for r in results)
    saved = tmp_path / "pose.pt"
    torch.save({f"{k}": v for k, v in results[0].state_dict().items()}, saved)
    from_file = LazyPoseEncoders(64, saved, "cpu", torch.float32)
    assert torch.equal(from_file.get().dwpose_embedding[0].weight, results[0].dwpose_embedding[0].weight)


def test_missing_or_mismatched_pose_weights_are_reported(tmp_path):
    absent = LazyPoseEncoders(64, tmp_path / "pose_encoders.safetensors", "cpu", torch.float32)
    assert not absent.available and "no trained pose-conditioning weights" in absent.missing_message()
    with pytest.raises(WeightsError, match="pose_encoders.safetensors"):
        absent.get()
    partial = tmp_path / "partial.pt"
    full = LazyPoseEncoders(64, None, "cpu", torch.float32, random_seed=0).get().state_dict()
    torch.save({k: v for k, v in full.items() if k.startswith("dwpose")}, partial)
    with pytest.raises(WeightsError, match="randomref_embedding_pose"):
        LazyPoseEncoders(64, partial, "cpu", torch.float32).get()
    with pytest.raises(WeightsError, match="dim 128"):
        LazyPoseEncoders(128, partial, "cpu", torch.float32).get()


class FakeDetector:
    """Stands in for DWPose: one body whose head follows the frame's mean brightness."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, image: np.ndarray) -> PoseFrame:
        self.calls += 1
        x = 0.2 + 0.6 * image.mean() / 255.0
        return PoseFrame(bodies=[body({0: (x, 0.2), 1: (x, 0.4), 8: (x - 0.1, 0.8), 11: (x + 0.1, 0.8)})])


def test_extraction_path_with_injected_detector(tiny_pipeline):
    detector = FakeDetector()
    animator = PoseAnimator(tiny_pipeline, LazyPoseEncoders(tiny_pipeline.generator.config.dim, None, "cpu", torch.float32, random_seed=0),
                            detector=detector)
    driving = [np.full((48, 48, 3), v, dtype=np.uint8) for v in (0, 60, 120, 180, 240)]
    reference = Image.new("RGB", (96, 64), (128, 128, 128))
    frames, reference_pose = animator.pose_video(reference, driving, False, latent_frames=3, height=64, width=96)
    assert frames.shape == (9, 64, 96, 3) and reference_pose.shape == (64, 96, 3)
    assert detector.calls == 1 + 5  # the reference once, each distinct driving frame once
    assert not np.array_equal(frames[0], frames[-1])
    request = animator.request(reference, driving, False,
                               GenerationRequest("dance", seed=3, num_blocks=1, height=64, width=96))
    results = list(tiny_pipeline.generate(request))
    assert [r.frames.shape[0] for r in results] == [1, 12]  # the reference frame first, then the block


def test_pose_video_mode_needs_no_detector(tiny_pipeline):
    animator = PoseAnimator(tiny_pipeline, LazyPoseEncoders(tiny_pipeline.generator.config.dim, None, "cpu", torch.float32, random_seed=0),
                            detector_dir=Path("/nonexistent"))
    driving = [np.full((64, 96, 3), v, dtype=np.uint8) for v in range(0, 250, 25)]
    base = GenerationRequest("dance", seed=1, num_blocks=2, height=64, width=96)
    request = animator.request(Image.new("RGB", (96, 64)), driving, True, base)
    assert isinstance(request, GenerationRequest) and request.reference_latent.shape == (1, 16, 1, 8, 12)
    with pytest.raises(WeightsError, match=DETECTOR_FILE):
        animator.request(Image.new("RGB", (96, 64)), driving, False, base)


def test_simcc_and_wholebody_decoding():
    simcc_x, simcc_y = np.zeros((133, 576)), np.zeros((133, 768))
    simcc_x[:, 100], simcc_y[:, 300] = 0.9, 0.8
    locations, confidence = decode_simcc(simcc_x, simcc_y)
    assert locations[0].tolist() == [50.0, 150.0] and confidence[0] == pytest.approx(0.8)
    keypoints = np.zeros((1, 133, 2))
    keypoints[0, 5], keypoints[0, 6] = (100, 50), (60, 50)  # left / right shoulder (COCO order)
    pose = wholebody_to_pose(keypoints, np.ones((1, 133)), 200, 100)
    np.testing.assert_allclose(pose.bodies[0][1, :2], [0.4, 0.5])  # neck = mean of shoulders
    np.testing.assert_allclose(pose.bodies[0][2, :2], [0.3, 0.5])  # OpenPose 2 = right shoulder
    assert len(pose.hands) == 2 and pose.faces[0].shape == (68, 3)


def test_yolox_decoding_finds_the_person_box():
    raw = np.zeros((1, 8400, 85))
    raw[0, :, 4] = -1  # nothing elsewhere
    cell = 20 * 80 + 10  # stride-8 grid cell (x=10, y=20)
    raw[0, cell, :4] = (0.5, 0.5, np.log(4.0), np.log(8.0))
    raw[0, cell, 4], raw[0, cell, 5] = 0.9, 0.9
    raw[0, cell + 1, :6] = (0.5, 0.5, np.log(4.0), np.log(8.0), 0.9, 0.8)  # overlapping duplicate
    boxes = decode_yolox(raw, ratio=0.5)
    assert len(boxes) == 1
    np.testing.assert_allclose(boxes[0], [(84 - 16) * 2, (164 - 32) * 2, (84 + 16) * 2, (164 + 32) * 2])


def test_empty_driving_video_is_rejected(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError):
        read_video(empty)


DWPOSE_DIR = Path(os.environ.get("SF_DWPOSE_DIR", "weights/dwpose"))


def test_real_dwpose_onnx_files():
    if not ((DWPOSE_DIR / DETECTOR_FILE).is_file() and (DWPOSE_DIR / POSE_FILE).is_file()):
        reason = f"DWPose ONNX files not found in {DWPOSE_DIR} (set SF_DWPOSE_DIR to run this test)"
        print(reason)
        pytest.skip(reason)
    detector = load_dwpose(DWPOSE_DIR)
    canvas = np.zeros((512, 384, 3), dtype=np.uint8)
    pose = detector(canvas)
    assert pose.bodies == []  # an empty image has nobody in it
