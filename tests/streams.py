"""Regroups generate() results (the first frame arrives as its own chunk) into whole blocks."""
from __future__ import annotations

import numpy as np


def block_frames(results) -> list[np.ndarray]:
    """Frames per block index, chunks of the same block joined."""
    grouped: dict[int, list[np.ndarray]] = {}
    for result in results:
        grouped.setdefault(result.index, []).append(result.frames)
    return [np.concatenate(grouped[i]) for i in sorted(grouped)]


def block_latents(results) -> list:
    return [r.latents for r in results if r.complete]
