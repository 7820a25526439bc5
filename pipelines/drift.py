"""Drift of a long stream: cheap statistics of each block's decoded frames and latents, compared with its first
blocks, so a viewer (and the optional guard of a continuous run) sees when the video starts to degrade (blur,
colour drift, washed-out or exploding latents) instead of finding out minutes later.

Everything here is a few reductions over arrays the stream already holds: well under a millisecond per block at
the tiny model's size, a few milliseconds at 832x480.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

HISTOGRAM_BINS = 4  # per RGB channel: 64 colour cells, coarse enough that motion does not move mass between them
REFERENCE_BLOCKS = 2  # the first blocks of a stream are what later blocks are compared with
STATISTICS_SIDE = 256  # frames are subsampled to about this many pixels on their longer side
DRIFT_THRESHOLD = 0.5  # the guard acts above this drift score (see BlockDrift.score)


@dataclass(frozen=True)
class BlockDrift:
    """One block's statistics (frames in [0, 1]) and how far they are from the stream's first blocks."""

    brightness: float  # mean luma
    brightness_spread: float  # its standard deviation (contrast)
    saturation: float  # mean HSV saturation
    saturation_spread: float
    sharpness: float  # mean absolute Laplacian of the luma (falls as frames blur)
    latent_rms: float  # root mean square of the clean latents
    similarity: float  # colour-histogram intersection with the first blocks (1 = the same colours)
    score: float  # drift: the largest of colour change (1 - similarity), sharpness lost and latent RMS change,
    # each relative to the first blocks (0 while they are the reference)

    def as_dict(self) -> dict[str, float]:
        return {name: round(value, 4) for name, value in self.__dict__.items()}


def frame_statistics(frames: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """(brightness, spread, saturation, spread, sharpness) of uint8 frames [T, H, W, 3], and their normalised
    colour histogram."""
    rgb = frames.astype(np.float32) / 255.0
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
    laplacian = (4 * luma[:, 1:-1, 1:-1] - luma[:, :-2, 1:-1] - luma[:, 2:, 1:-1] - luma[:, 1:-1, :-2]
                 - luma[:, 1:-1, 2:])
    cells = (frames.astype(np.int64) * HISTOGRAM_BINS) // 256
    index = (cells[..., 0] * HISTOGRAM_BINS + cells[..., 1]) * HISTOGRAM_BINS + cells[..., 2]
    histogram = np.bincount(index.ravel(), minlength=HISTOGRAM_BINS ** 3).astype(np.float64)
    stats = {"brightness": float(luma.mean()), "brightness_spread": float(luma.std()),
             "saturation": float(saturation.mean()), "saturation_spread": float(saturation.std()),
             "sharpness": float(np.abs(laplacian).mean()) if laplacian.size else 0.0}
    return stats, histogram / max(histogram.sum(), 1.0)


class DriftMonitor:
    """One stream's drift, block by block (never shared between streams)."""

    def __init__(self, reference_blocks: int = REFERENCE_BLOCKS) -> None:
        self.reference_blocks = reference_blocks
        self._histograms: list[np.ndarray] = []
        self._sharpness: list[float] = []
        self._latent_rms: list[float] = []

    def add(self, frames: np.ndarray, latents: torch.Tensor | None) -> BlockDrift:
        """The statistics of the next block (its decoded frames and clean latents) and its drift score."""
        stride = max(1, max(frames.shape[1:3]) // STATISTICS_SIDE)  # (a few frames at about 256 pixels suffice)
        stats, histogram = frame_statistics(frames[::max(1, len(frames) // 3), ::stride, ::stride])
        latent_rms = float(latents.float().pow(2).mean().sqrt()) if latents is not None else 0.0
        if len(self._histograms) < self.reference_blocks:
            self._histograms.append(histogram)
            self._sharpness.append(stats["sharpness"])
            self._latent_rms.append(latent_rms)
        reference = np.mean(self._histograms, axis=0)
        similarity = float(np.minimum(histogram, reference).sum())
        sharpness_ref, rms_ref = float(np.mean(self._sharpness)), float(np.mean(self._latent_rms))
        blur = max(0.0, 1.0 - stats["sharpness"] / sharpness_ref) if sharpness_ref > 0 else 0.0
        latent_change = abs(latent_rms / rms_ref - 1.0) if rms_ref > 0 else 0.0
        score = max(1.0 - similarity, blur, latent_change)
        return BlockDrift(**stats, latent_rms=latent_rms, similarity=similarity, score=score)
