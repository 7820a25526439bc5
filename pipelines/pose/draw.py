"""Keypoint containers and the standard coloured OpenPose/DWPose skeleton rendering.

Body keypoints use the 18-point OpenPose order (nose, neck, r-shoulder, r-elbow, r-wrist,
l-shoulder, l-elbow, l-wrist, r-hip, r-knee, r-ankle, l-hip, l-knee, l-ankle, r-eye, l-eye,
r-ear, l-ear); hands 21 points each, face 68. Coordinates are normalised to [0, 1]; a point
with confidence below the threshold is treated as missing.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

BODY_LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
              (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)]
BODY_COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
               (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
               (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
HAND_EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]
CONFIDENCE = 0.3


@dataclass
class PoseFrame:
    """Keypoints of one frame: arrays of shape [N, 3] holding (x, y, confidence) per point."""

    bodies: list[np.ndarray] = field(default_factory=list)  # each [18, 3]
    hands: list[np.ndarray] = field(default_factory=list)  # each [21, 3]
    faces: list[np.ndarray] = field(default_factory=list)  # each [68, 3]

    def transformed(self, scale: np.ndarray, offset: np.ndarray) -> "PoseFrame":
        """x' = x * scale + offset for every point (confidences unchanged)."""
        def move(points: np.ndarray) -> np.ndarray:
            moved = points.copy()
            moved[:, :2] = points[:, :2] * scale + offset
            return moved
        return PoseFrame([move(b) for b in self.bodies], [move(h) for h in self.hands], [move(f) for f in self.faces])


def _visible(point: np.ndarray) -> bool:
    return point[2] >= CONFIDENCE


def _limb_polygon(a: tuple[float, float], b: tuple[float, float], width: float) -> list[tuple[float, float]]:
    """An ellipse around the segment a-b, like OpenPose's stick rendering."""
    (x0, y0), (x1, y1) = a, b
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    length = math.hypot(x1 - x0, y1 - y0) / 2
    angle = math.atan2(y1 - y0, x1 - x0)
    points = []
    for step in range(0, 360, 15):
        t = math.radians(step)
        ex, ey = length * math.cos(t), width * math.sin(t)
        points.append((cx + ex * math.cos(angle) - ey * math.sin(angle), cy + ex * math.sin(angle) + ey * math.cos(angle)))
    return points


def draw_pose(frame: PoseFrame, width: int, height: int, stick_width: float = 4.0) -> np.ndarray:
    """Renders one frame's skeleton on black: uint8 [height, width, 3]."""
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    size = np.array([width, height], dtype=np.float64)

    def pixel(point: np.ndarray) -> tuple[float, float]:
        return tuple(point[:2] * size)

    for body in frame.bodies:
        for index, (i, j) in enumerate(BODY_LIMBS):
            if _visible(body[i]) and _visible(body[j]):
                color = tuple(int(c * 0.6) for c in BODY_COLORS[index])
                draw.polygon(_limb_polygon(pixel(body[i]), pixel(body[j]), stick_width), fill=color)
        for index, point in enumerate(body):
            if _visible(point):
                x, y = pixel(point)
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=BODY_COLORS[index])
    for hand in frame.hands:
        for index, (i, j) in enumerate(HAND_EDGES):
            if _visible(hand[i]) and _visible(hand[j]):
                r, g, b = colorsys.hsv_to_rgb(index / len(HAND_EDGES), 1.0, 1.0)
                draw.line([pixel(hand[i]), pixel(hand[j])], fill=(int(r * 255), int(g * 255), int(b * 255)), width=2)
        for point in hand:
            if _visible(point):
                x, y = pixel(point)
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(0, 0, 255))
    for face in frame.faces:
        for point in face:
            if _visible(point):
                x, y = pixel(point)
                draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=(255, 255, 255))
    return np.asarray(canvas)
