"""Aligning a driving pose sequence to the reference character and resampling it in time.

The first driving frame's body is mapped onto the reference image's body with one scale and
one translation (from the visible body keypoints shared by both); every frame gets the same
transform, so the motion is kept and only placement and size change.
"""
from __future__ import annotations

import numpy as np

from .draw import CONFIDENCE, PoseFrame


def _shared_points(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    visible = (a[:, 2] >= CONFIDENCE) & (b[:, 2] >= CONFIDENCE)
    return a[visible, :2], b[visible, :2]


def alignment_transform(driving_first: PoseFrame, reference: PoseFrame) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) with reference ≈ driving * scale + offset, from the first bodies' keypoints.

    Scale is the ratio of the two point sets' spreads (isotropic, so proportions are kept);
    the offset aligns their centroids. Without two shared visible points it is the identity.
    """
    if not driving_first.bodies or not reference.bodies:
        return np.ones(2), np.zeros(2)
    source, target = _shared_points(driving_first.bodies[0], reference.bodies[0])
    if len(source) < 2:
        return np.ones(2), np.zeros(2)
    source_center, target_center = source.mean(0), target.mean(0)
    source_spread = np.linalg.norm(source - source_center, axis=1).mean()
    target_spread = np.linalg.norm(target - target_center, axis=1).mean()
    scale = target_spread / source_spread if source_spread > 1e-8 else 1.0
    return np.full(2, scale), target_center - source_center * scale


def align_sequence(driving: list[PoseFrame], reference: PoseFrame) -> list[PoseFrame]:
    if not driving:
        return []
    scale, offset = alignment_transform(driving[0], reference)
    return [frame.transformed(scale, offset) for frame in driving]


def resample_indices(source_frames: int, target_frames: int) -> list[int]:
    """Nearest-frame indices that stretch or squeeze source_frames evenly onto target_frames."""
    if source_frames <= 0:
        raise ValueError("the driving video has no frames")
    if target_frames <= 1:
        return [0] * max(target_frames, 0)
    positions = np.linspace(0, source_frames - 1, target_frames)
    return [int(np.floor(p + 0.5)) for p in positions]  # round half up: even spacing

