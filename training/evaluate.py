"""Scores generated videos of the synthetic world by colour segmentation.

A pixel belongs to a named colour when that palette colour is its nearest one (shape and
background palettes together) and it is close enough to it. From the mask of the caption's
colour, each frame gives a blob (centroid, area) or nothing; the video's motion is the shift of
the blob's centroid from the first quarter of the frames to the last. For stick figures, the
error is the distance from each limb keypoint to the nearest pixel of the figure's colour.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .synthetic import ALL_BACKGROUND_COLOURS, DIRECTIONS, NOVEL_COLOURS, SHAPE_COLOURS

# The novel colours are in the palette too: a fine-tuned concept's blob is found like the world's own.
_SHAPE_PALETTE = {**SHAPE_COLOURS, **NOVEL_COLOURS}
_PALETTE_NAMES = list(_SHAPE_PALETTE) + [f"background:{name}" for name in ALL_BACKGROUND_COLOURS]
_PALETTE = np.array(list(_SHAPE_PALETTE.values()) + list(ALL_BACKGROUND_COLOURS.values()), dtype=np.float32)
MAX_COLOUR_DISTANCE = 90.0  # RGB distance beyond which a pixel is no palette colour (edges, smears)
MIN_BLOB_FRACTION = 0.004  # of the frame's pixels: ~25 pixels at 96x64
PRESENT_FRACTION = 0.75  # of the frames in which the blob must be found
MIN_SHIFT = 0.06  # centroid shift (fraction of the frame) that counts as moving along an axis
LIMB_POINTS = (3, 4, 6, 7, 9, 10, 12, 13)  # elbows, wrists, knees, ankles (OpenPose order)


def colour_mask(frames: np.ndarray, colour: str) -> np.ndarray:
    """bool [T, H, W]: pixels whose nearest palette colour is `colour` and most of whose 3x3
    neighbourhood is too (scattered specks of a colour are no blob)."""
    pixels = frames.astype(np.float32)[..., None, :]
    distance = np.linalg.norm(pixels - _PALETTE, axis=-1)
    mask = (distance.argmin(-1) == _PALETTE_NAMES.index(colour)) & (distance.min(-1) < MAX_COLOUR_DISTANCE)
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    height, width = mask.shape[1:]
    neighbours = sum(padded[:, dy:dy + height, dx:dx + width].astype(np.int8) for dy in range(3) for dx in range(3))
    return mask & (neighbours >= 6)


@dataclass
class BlobTrack:
    centroids: np.ndarray  # [T, 2] (x, y) as fractions of the frame, NaN where no blob
    areas: np.ndarray  # [T] fraction of the frame

    @property
    def present(self) -> np.ndarray:
        return ~np.isnan(self.centroids[:, 0])

    @property
    def found(self) -> bool:
        return bool(self.present.mean() >= PRESENT_FRACTION)

    def shift(self) -> np.ndarray | None:
        """(dx, dy): mean centroid of the last quarter of the frames minus that of the first quarter."""
        quarter = max(1, len(self.areas) // 4)
        head, tail = self.centroids[:quarter], self.centroids[-quarter:]
        head, tail = head[~np.isnan(head[:, 0])], tail[~np.isnan(tail[:, 0])]
        if not len(head) or not len(tail):
            return None
        return tail.mean(0) - head.mean(0)


def track_blob(frames: np.ndarray, colour: str) -> BlobTrack:
    mask = colour_mask(frames, colour)
    frames_count, height, width = mask.shape
    centroids = np.full((frames_count, 2), np.nan)
    areas = mask.reshape(frames_count, -1).mean(1)
    ys, xs = np.mgrid[0:height, 0:width]
    for index in range(frames_count):
        if areas[index] >= MIN_BLOB_FRACTION:
            m = mask[index]
            centroids[index] = ((xs[m].mean() + 0.5) / width, (ys[m].mean() + 0.5) / height)
    return BlobTrack(centroids, areas)


def direction_matches(track: BlobTrack, motion: str) -> bool:
    """The blob moved the caption's way: along each named axis by at least MIN_SHIFT with the right
    sign, and along an unnamed axis by less than MIN_SHIFT (or less than half the main shift)."""
    shift = track.shift()
    if shift is None:
        return False
    expected = DIRECTIONS[motion]
    main = max(abs(shift[axis]) for axis in (0, 1) if expected[axis])
    for axis in (0, 1):
        if expected[axis]:
            if shift[axis] * expected[axis] < MIN_SHIFT:
                return False
        elif abs(shift[axis]) >= max(MIN_SHIFT, 0.5 * main):
            return False
    return True


@dataclass
class PromptScore:
    caption: str
    colour: str
    motion: str
    found: bool
    direction_ok: bool
    shift: tuple[float, float] | None


def score_video(frames: np.ndarray, caption: str, colour: str, motion: str) -> PromptScore:
    track = track_blob(frames, colour)
    shift = track.shift()
    return PromptScore(caption, colour, motion, track.found, track.found and direction_matches(track, motion),
                       None if shift is None else (float(shift[0]), float(shift[1])))


def summarise(scores: list[PromptScore]) -> dict[str, float]:
    return {"prompts": len(scores), "colour_found": float(np.mean([s.found for s in scores])),
            "direction_ok": float(np.mean([s.direction_ok for s in scores]))}


def keypoint_error(frames: np.ndarray, keypoints: np.ndarray, colour: str) -> float:
    """Mean distance (fraction of the frame height) from the limb keypoints [T, 18, 3] to the nearest
    pixel of the figure's colour; a frame without such pixels counts the frame's diagonal."""
    mask = colour_mask(frames, colour)
    _, height, width = mask.shape
    errors = []
    for index in range(len(frames)):
        ys, xs = np.nonzero(mask[index])
        points = keypoints[index, LIMB_POINTS, :2] * np.array([width, height])
        if not len(xs):
            errors.extend([np.hypot(width, height) / height] * len(points))
            continue
        pixels = np.stack([xs + 0.5, ys + 0.5], 1)
        nearest = np.linalg.norm(points[:, None] - pixels[None], axis=-1).min(1)
        errors.extend(nearest / height)
    return float(np.mean(errors))
