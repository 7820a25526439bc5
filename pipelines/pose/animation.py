"""Turns (reference image, driving video or pose video) into a pose-conditioned GenerationRequest.

The request runs through the same StreamingVideoPipeline.generate() as the other tabs: the
reference latent (plus its pose features) is prefilled into the KV cache as frame 0 and every
block adds its own slice of the pose tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core import GenerationRequest, RequestError, StreamingVideoPipeline, prepare_image
from ..loading.vae import frames_for_latents
from ..video_input import VideoSource
from .align import align_sequence, resample_indices
from .condition import LazyPoseEncoders, PoseConditioning
from .draw import draw_pose
from .extract import PoseDetector, load_dwpose, missing_dwpose_message
from .live import LivePoseFrames, StreamingPoseConditioning


class PoseAnimator:
    """Per-process pose tooling: lazily loaded pose encoders and DWPose detector."""

    def __init__(self, pipeline: StreamingVideoPipeline, encoders: LazyPoseEncoders,
                 detector_dir: Path | None = None, detector: PoseDetector | None = None) -> None:
        self.pipeline = pipeline
        self.encoders = encoders
        self.detector_dir = detector_dir
        self._detector = detector
        self._lock = threading.Lock()

    def for_pipeline(self, pipeline: StreamingVideoPipeline) -> "PoseAnimator":
        """The same encoders and detector over another pipeline of the same weights (new settings)."""
        return PoseAnimator(pipeline, self.encoders, self.detector_dir, self._detector)

    def detector(self) -> PoseDetector:
        with self._lock:
            if self._detector is None:
                self._detector = load_dwpose(self.detector_dir)
            return self._detector

    def detector_missing(self) -> str | None:
        """What DWPose still needs (None when ready), checked without loading it."""
        return None if self._detector is not None else missing_dwpose_message(self.detector_dir)

    def pose_video(self, reference: Image.Image, driving: list[np.ndarray], is_pose_video: bool, latent_frames: int,
                   height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(pose frames uint8 [4n-3, H, W, 3], reference pose image uint8 [H, W, 3]) at the model size."""
        indices = resample_indices(len(driving), frames_for_latents(latent_frames))
        if is_pose_video:
            frames = np.stack([_fit(driving[i], height, width) for i in indices])
            return frames, frames[0]
        detect = self.detector()
        reference_pixels = _fit(np.asarray(reference.convert("RGB")), height, width)
        reference_pose = detect(reference_pixels)
        needed = sorted(set(indices))
        detected = dict(zip(needed, align_sequence([detect(_fit(driving[i], height, width)) for i in needed],
                                                   reference_pose)))
        frames = np.stack([draw_pose(detected[i], width, height) for i in indices])
        return frames, draw_pose(reference_pose, width, height)

    @torch.no_grad()
    def request(self, reference: Image.Image, driving: list[np.ndarray], is_pose_video: bool,
                base: GenerationRequest) -> GenerationRequest:
        """`base` (prompt, seed, length, size) plus the pose conditioning and the reference latent."""
        validated = self.pipeline.validate(base)
        num_blocks, height, width = validated.num_blocks, validated.height, validated.width
        latent_frames = num_blocks * self.pipeline.config.frames_per_block
        pose_frames, reference_pose = self.pose_video(reference, driving, is_pose_video, latent_frames, height, width)
        tokens = self.encoders.get().pose_tokens(pose_frames)
        reference_latent, frame_tokens = self._reference(reference, reference_pose, height, width)
        return dataclasses.replace(base, num_blocks=num_blocks, height=height, width=width,
                                   conditioning=PoseConditioning(tokens, frame_tokens, prefix_frames=1),
                                   reference_latent=reference_latent)

    @torch.no_grad()
    def live_request(self, reference: Image.Image, source: VideoSource, is_pose_video: bool,
                     base: GenerationRequest) -> GenerationRequest:
        """`base` plus pose conditioning read from `source` as the run goes (live.StreamingPoseConditioning). Its
        first frame sets the reference pose (a pose video) or the alignment to the character (DWPose)."""
        validated = self.pipeline.validate(base)
        height, width = validated.height, validated.width
        fit = functools.partial(_fit, height=height, width=width)
        if is_pose_video:
            frames = LivePoseFrames(source, fit)
        else:
            detect = self.detector()
            frames = LivePoseFrames(source, fit, detect, detect(fit(np.asarray(reference.convert("RGB")))),
                                    (height, width))
        first = frames.next()
        if first is None:
            raise RequestError("No frames came from the driving video or camera (a camera: allow the page to use it "
                               "and start its stream before Generate).")
        reference_pose = first if is_pose_video else draw_pose(frames.reference_pose, width, height)
        reference_latent, frame_tokens = self._reference(reference, reference_pose, height, width)
        conditioning = StreamingPoseConditioning(self.encoders.get(), frames, first, frame_tokens, prefix_frames=1)
        return dataclasses.replace(base, height=height, width=width, conditioning=conditioning,
                                   reference_latent=reference_latent)

    def _reference(self, reference: Image.Image, reference_pose: np.ndarray, height: int,
                   width: int) -> tuple[torch.Tensor, int]:
        """(the reference image's latent with its pose's features added, tokens per latent frame) at this size."""
        reference_latent = self.pipeline.vae.encode(prepare_image(reference, height, width))
        reference_latent = reference_latent + self.encoders.get().reference_features(reference_pose).to(reference_latent)
        return reference_latent, self.pipeline.generator.frame_tokens(*self.pipeline.config.latent_size(height, width))


def make_pose_animator(pipeline: StreamingVideoPipeline, weights_dir: Path | None) -> PoseAnimator:
    """Pose tooling with paths from the config's pose section: the encoders beside the model's files,
    the DWPose detector in the weights folder."""
    pose = pipeline.config.pose
    model_dir = pipeline.components.model_dir
    weights_file = model_dir / pose["weights"] if model_dir and pose.get("weights") else None
    encoders = LazyPoseEncoders(pipeline.generator.config.dim, weights_file, pipeline.device, pipeline.dtype,
                                pose.get("random_seed"))
    detector_dir = weights_dir / pose.get("detector_dir", "dwpose") if weights_dir else None
    return PoseAnimator(pipeline, encoders, detector_dir)


def _fit(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Cover-resize and centre-crop an RGB frame to height x width (as images are for I2V)."""
    tensor = prepare_image(Image.fromarray(frame), height, width)
    return ((tensor[0, :, 0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
