"""Pose tokens for a driving video that arrives while the run goes on (a camera, or a file read frame by frame).

The pose video encoder (condition.PoseEncoders.dwpose_embedding) is a stack of temporal 3-convolutions with two
stride-2 steps: latent frame j's tokens depend on padded pose frames 4j-7 .. 4j+7 (the encoder repeats the first
frame three times in front). So block k's tokens are exact, equal to those of the whole video, once the frames up
to 4 past the block's own have arrived (a quarter of a second at 16 fps), computed over a window that starts 8
frames before the block, on a multiple of 4 (the strides' phase). When the input ends, its last tokens see the end
of the video as the whole video's do. Nothing is resampled in time: the frames are taken as they come.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..video_input import VideoSource
from .align import alignment_transform
from .condition import PoseEncoders
from .draw import PoseFrame, draw_pose

FIRST_FRAME_REPEATS = 3  # PoseEncoders.pose_tokens puts the first frame in front three more times
STRIDE = 4  # pose frames per latent frame
LOOK_BACK = 8  # padded frames before a token's group that it depends on (7, rounded to the stride)
LOOK_AHEAD = 4  # padded frames after a token's group that it depends on


class LivePoseFrames:
    """A driving source turned into pose images at the model size: skeletons taken as they are, or camera frames
    through DWPose, aligned to the reference character with the first frame's transform (as align_sequence does)."""

    def __init__(self, source: VideoSource, fit: Callable[[np.ndarray], np.ndarray],
                 detect: Callable[[np.ndarray], PoseFrame] | None = None, reference_pose: PoseFrame | None = None,
                 size: tuple[int, int] | None = None) -> None:
        self.source, self.fit, self.detect = source, fit, detect
        self.reference_pose, self.size = reference_pose, size
        self.transform: tuple[np.ndarray, np.ndarray] | None = None

    def next(self) -> np.ndarray | None:
        """The next pose image (uint8 [H, W, 3]), or None when the source ended."""
        frames = self.source.read(1)
        if frames is None:
            return None
        frame = self.fit(frames[0])
        if self.detect is None:
            return frame
        pose = self.detect(frame)
        if self.transform is None:
            self.transform = alignment_transform(pose, self.reference_pose)
        height, width = self.size
        return draw_pose(pose.transformed(*self.transform), width, height)


class StreamingPoseConditioning:
    """Per-block pose tokens (core.BlockConditioning) from pose frames read as the blocks need them."""

    def __init__(self, encoders: PoseEncoders, frames: LivePoseFrames, first_frame: np.ndarray, frame_tokens: int,
                 prefix_frames: int = 1) -> None:
        self.encoders, self.frames = encoders, frames
        self.frame_tokens, self.prefix_frames = frame_tokens, prefix_frames
        self.padded = [first_frame] * (FIRST_FRAME_REPEATS + 1)  # the encoder's input so far, from padded frame
        self.offset = 0  # ... `offset` on (older frames are no longer needed)
        self.ended = False
        self._cached: tuple[int, int, torch.Tensor] | None = None  # the last block's tokens (denoise and write ask)

    def frames_ready(self, start_frame: int, num_frames: int) -> bool:
        """Whether the pose frames of these latent frames arrived (False: the driving video ended before them)."""
        if start_frame < self.prefix_frames:
            return True
        last = start_frame - self.prefix_frames + num_frames - 1
        self._read_until(STRIDE * last + STRIDE + LOOK_AHEAD)
        return self.offset + len(self.padded) >= STRIDE * (last + 1)

    def token_bias(self, start_frame: int, num_frames: int) -> torch.Tensor | None:
        if start_frame < self.prefix_frames:
            return None  # the reference frame carries its pose through reference_features
        if self._cached is not None and self._cached[:2] == (start_frame, num_frames):
            return self._cached[2]
        if not self.frames_ready(start_frame, num_frames):
            raise ValueError(f"the driving video ended before latent frame {start_frame + num_frames - 1}")
        first = start_frame - self.prefix_frames
        window_start = max(0, STRIDE * first - LOOK_BACK)
        window_end = STRIDE * (first + num_frames) + LOOK_AHEAD
        available = self.offset + len(self.padded)
        if window_end > available:  # only once the input ended: the video's own end, as for the whole video
            window_end = available - available % STRIDE
        video = np.stack(self.padded[window_start - self.offset:window_end - self.offset])
        tokens = self.encoders.padded_pose_tokens(video[None])
        skip = (first - window_start // STRIDE) * self.frame_tokens
        bias = tokens[:, skip:skip + num_frames * self.frame_tokens]
        self._cached = (start_frame, num_frames, bias)
        self._forget_before(max(0, STRIDE * (first + num_frames) - LOOK_BACK))  # where the next block's window starts
        return bias

    def _read_until(self, padded_frames: int) -> None:
        while not self.ended and self.offset + len(self.padded) < padded_frames:
            frame = self.frames.next()
            if frame is None:
                self.ended = True
            else:
                self.padded.append(frame)

    def _forget_before(self, padded_frame: int) -> None:
        """Drops the frames before `padded_frame` (no later window reaches back to them)."""
        keep_from = max(self.offset, padded_frame - padded_frame % STRIDE)
        del self.padded[:keep_from - self.offset]
        self.offset = keep_from
