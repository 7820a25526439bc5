"""A procedural world the tiny default model is trained on: coloured shapes and stick figures.

Every clip is drawn from its parameters (a Scene), and its caption is written from the same
parameters, so the caption is true by construction. Everything is seeded: clip i of a split is
the same on every machine. Some (colour, shape, motion) triples never appear in training: they
are the held-out prompts the evaluator (training/evaluate.py) scores the trained model on.

Sizes are the tiny config's presets (96x64, 64x96, 128x80), 16 fps, 4k+1 frames.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pipelines.pose.draw import PoseFrame, draw_pose

# Shape colours are saturated and background colours dark or pale, at least ~90 apart in RGB, so a
# pixel's nearest palette colour tells shape from background (what the evaluator's colour
# segmentation relies on).
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 100, 245), "yellow": (245, 220, 40),
    "purple": (160, 70, 230), "orange": (250, 140, 20), "cyan": (40, 215, 225), "white": (245, 245, 245),
    "pink": (250, 130, 200),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 12), "dark blue": (20, 30, 90), "dark green": (20, 70, 35), "dark gray": (60, 60, 66),
    "brown": (85, 55, 30), "dark purple": (55, 25, 70),
}
# Brighter backgrounds, on some training clips: without them an input image outside the dark palette
# came back at ~13 dB in image-to-video (the VAE had never seen one).
BRIGHT_BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "gray": (125, 125, 130), "light blue": (150, 180, 215), "beige": (205, 180, 140),
}
ALL_BACKGROUND_COLOURS = {**BACKGROUND_COLOURS, **BRIGHT_BACKGROUND_COLOURS}
BRIGHT_FRACTION = 0.25  # of training clips whose (first) background colour is a bright one
UNNAMED_BACKGROUND_FRACTION = 0.15  # of training captions naming no background (users often leave it out)
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
# A colour and a shape the world never draws (nor names: the caption encoder reads them as <unk>): the
# concept the fine-tuning example and its tests teach the trained model (concept_scenes).
NOVEL_COLOURS: dict[str, tuple[int, int, int]] = {"magenta": (235, 20, 160)}  # ~115 from purple, pink and red
NOVEL_SHAPES = ("heart",)
# Sign of travel along x (right) and y (down) per directional motion.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1),
    "up-right": (1, -1), "up-left": (-1, -1), "down-right": (1, 1), "down-left": (-1, 1),
}
MOTIONS = (*DIRECTIONS, "bounce", "grow", "shrink")
MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "right": ("moves to the right", "moves right", "slides to the right", "drifts right"),
    "left": ("moves to the left", "moves left", "slides to the left", "drifts left"),
    "up": ("moves up", "rises", "floats upward", "moves upward"),
    "down": ("moves down", "falls", "drops down", "moves downward"),
    "up-right": ("moves up and to the right", "moves diagonally up and right"),
    "up-left": ("moves up and to the left", "moves diagonally up and left"),
    "down-right": ("moves down and to the right", "moves diagonally down and right"),
    "down-left": ("moves down and to the left", "moves diagonally down and left"),
    "bounce": ("bounces around", "bounces off the walls"),
    "grow": ("grows", "grows bigger", "expands"),
    "shrink": ("shrinks", "gets smaller", "shrinks away"),
}
FIGURE_ACTIONS: dict[str, tuple[str, ...]] = {
    "wave": ("waves its arms", "waves both arms"),
    "walk": ("walks", "walks in place"),
    "jump": ("jumps", "jumps up and down"),
    "dance": ("dances", "dances around"),
}
SIZES = ((64, 96), (96, 64), (80, 128))  # (height, width) of the tiny config's presets
FPS = 16
CLIP_FRAMES = 37  # 10 latent frames: three 3-frame blocks, after an image prefix on image and pose steps
HELD_OUT_FRACTION = 0.1


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    motion: str
    start: tuple[float, float]  # centre, as a fraction of (width, height)
    size: float  # radius as a fraction of the frame height
    speed: float  # fraction of the frame (per moving axis) crossed per second
    heading: tuple[float, float] = (1.0, 0.0)  # bounce direction

    def describe(self, rng: random.Random) -> str:
        return f"{article(self.colour)} {self.colour} {self.shape} {rng.choice(MOTION_PHRASES[self.motion])}"


@dataclass(frozen=True)
class Background:
    colours: tuple[str, ...]  # one colour, or two for a split background
    vertical_split: bool = False

    def describe(self) -> str:
        if len(self.colours) == 1:
            return f"a {self.colours[0]} background"
        return f"a {self.colours[0]} and {self.colours[1]} background"


@dataclass(frozen=True)
class FigureSpec:
    """A stick figure driven by 18 OpenPose keypoints."""

    colour: str
    action: str
    centre_x: float
    height: float  # figure height as a fraction of the frame height
    phase: float
    tempo: float  # cycles per second
    drift: float  # horizontal drift, frame widths per second

    def describe(self, rng: random.Random) -> str:
        return f"{article(self.colour)} {self.colour} stick figure {rng.choice(FIGURE_ACTIONS[self.action])}"


@dataclass(frozen=True)
class Scene:
    height: int
    width: int
    frames: int
    background: Background
    shapes: tuple[ShapeSpec, ...] = ()
    figure: FigureSpec | None = None
    caption: str = ""


def held_out_triples(seed: int = 0) -> set[tuple[str, str, str]]:
    """(colour, shape, direction) triples kept out of training. Each one's pairs (colour-shape,
    shape-motion, colour-motion) still appear in training, so the test is composition."""
    triples = sorted(itertools.product(SHAPE_COLOURS, SHAPES, DIRECTIONS))
    rng = random.Random(seed)
    held: set[tuple[str, str, str]] = set()
    for triple in rng.sample(triples, len(triples)):
        if len(held) >= int(len(triples) * HELD_OUT_FRACTION):
            break
        pairs = [(0, 1), (1, 2), (0, 2)]
        kept = [t for t in triples if t not in held and t != triple]
        if all(any((t[a], t[b]) == (triple[a], triple[b]) for t in kept) for a, b in pairs):
            held.add(triple)
    return held


class SyntheticWorld:
    """Draws scenes: `scene(i)` for training clip i, `held_out_scene(i)` for evaluation."""

    def __init__(self, seed: int = 0, frames: int = CLIP_FRAMES,
                 sizes: tuple[tuple[int, int], ...] = SIZES) -> None:
        if (frames - 1) % 4:
            raise ValueError(f"frames must be 4k+1, got {frames}")
        self.seed = seed
        self.frames = frames
        self.sizes = sizes
        self.held_out = held_out_triples(seed)

    def _rng(self, kind: str, index: int) -> random.Random:
        return random.Random(f"{self.seed}-{kind}-{index}")

    def _size(self, rng: random.Random) -> tuple[int, int]:
        return self.sizes[0] if rng.random() < 0.6 or len(self.sizes) == 1 else rng.choice(self.sizes[1:])

    def _background(self, rng: random.Random) -> Background:
        first = rng.choice(list(BRIGHT_BACKGROUND_COLOURS if rng.random() < BRIGHT_FRACTION else BACKGROUND_COLOURS))
        if rng.random() < 0.7:
            return Background((first,))
        second = rng.choice([name for name in ALL_BACKGROUND_COLOURS if name != first])
        return Background((first, second), vertical_split=rng.random() < 0.5)

    def _shape(self, rng: random.Random, colour: str, shape: str, motion: str, aspect: float, small: bool) -> ShapeSpec:
        size = rng.uniform(0.09, 0.14) if small else rng.uniform(0.13, 0.2)
        travel = rng.uniform(0.3, 0.5)  # fraction of the frame crossed along each moving axis over the clip
        margin_y, margin_x = 1.25 * size + 0.02, (1.25 * size + 0.02) / aspect
        x, y = rng.uniform(margin_x, 1 - margin_x), rng.uniform(margin_y, 1 - margin_y)
        if motion in DIRECTIONS:
            dx, dy = DIRECTIONS[motion]
            # start where the whole path stays inside the frame
            low_x, high_x = margin_x + travel * (dx < 0), 1 - margin_x - travel * (dx > 0)
            low_y, high_y = margin_y + travel * (dy < 0), 1 - margin_y - travel * (dy > 0)
            x = rng.uniform(low_x, max(low_x, high_x))
            y = rng.uniform(low_y, max(low_y, high_y))
        heading = (1.0, 0.0)
        if motion == "bounce":
            angle = rng.uniform(0, 2 * math.pi)
            heading = (math.cos(angle), math.sin(angle))
            travel *= 2
        if motion == "grow":
            size = rng.uniform(0.07, 0.1)
        return ShapeSpec(shape, colour, motion, (x, y), size, travel * FPS / (self.frames - 1), heading)

    def scene(self, index: int) -> Scene:
        """Training clip `index`: 1-3 shapes (no held-out triple), or a stick figure every 4th clip."""
        rng = self._rng("train", index)
        height, width = self._size(rng)
        background = self._background(rng)
        if index % 4 == 3:
            return self.figure_scene(rng, height, width, background)
        count = rng.choices((1, 2, 3), weights=(0.6, 0.25, 0.15))[0]
        colours = rng.sample(list(SHAPE_COLOURS), count)
        shapes = []
        for k, colour in enumerate(colours):
            while True:
                shape, motion = rng.choice(SHAPES), rng.choice(MOTIONS)
                if (colour, shape, motion) not in self.held_out:
                    break
            shapes.append(self._shape(rng, colour, shape, motion, width / height, small=k > 0))
        return self._with_caption(Scene(height, width, self.frames, background, tuple(shapes)), rng)

    def held_out_scene(self, index: int, size: tuple[int, int] | None = None, bright: bool = False,
                       name_background: bool = True) -> Scene:
        """Evaluation scene `index`: one shape whose (colour, shape, direction) was never trained on, on a
        dark background (or a bright one), its caption naming the background (or not)."""
        rng = self._rng("held-out-bright" if bright else "held-out", index)
        colour, shape, motion = sorted(self.held_out)[index % len(self.held_out)]
        height, width = size or self.sizes[0]
        spec = self._shape(rng, colour, shape, motion, width / height, small=False)
        background = Background((rng.choice(list(BRIGHT_BACKGROUND_COLOURS if bright else BACKGROUND_COLOURS)),))
        return self._with_caption(Scene(height, width, self.frames, background, (spec,)), rng, name_background)

    def figure_scene(self, rng: random.Random, height: int, width: int, background: Background,
                     name_background: bool | None = None) -> Scene:
        figure = FigureSpec(colour=rng.choice(["white", "yellow", "cyan", "orange", "pink"]),
                            action=rng.choice(list(FIGURE_ACTIONS)), centre_x=rng.uniform(0.35, 0.65),
                            height=rng.uniform(0.7, 0.85), phase=rng.uniform(0, 2 * math.pi),
                            tempo=rng.uniform(0.6, 1.3), drift=rng.uniform(-0.08, 0.08))
        return self._with_caption(Scene(height, width, self.frames, background, figure=figure), rng, name_background)

    def figure_scene_at(self, index: int, size: tuple[int, int] | None = None) -> Scene:
        """A held-out stick-figure scene (its own seed stream), for the pose evaluation and examples."""
        rng = self._rng("figure", index)
        height, width = size or self.sizes[0]
        return self.figure_scene(rng, height, width, Background((rng.choice(list(BACKGROUND_COLOURS)),)), True)

    def concept_scene(self, index: int, colour: str = "magenta", shape: str = "heart",
                      motions: tuple[str, ...] = ("right", "left", "up", "down")) -> Scene:
        """Clip `index` of a concept outside the world (a novel colour and shape, NOVEL_COLOURS / NOVEL_SHAPES)
        moving in a named direction on the world's backgrounds, captioned as the world's clips are."""
        rng = self._rng(f"concept-{colour}-{shape}", index)
        height, width = self.sizes[0]
        motion = motions[index % len(motions)]
        spec = self._shape(rng, colour, shape, motion, width / height, small=False)
        background = Background((rng.choice(list(BACKGROUND_COLOURS)),))
        return self._with_caption(Scene(height, width, self.frames, background, (spec,)), rng, True)

    @staticmethod
    def _with_caption(scene: Scene, rng: random.Random, name_background: bool | None = None) -> Scene:
        """The scene with its caption; name_background None: a training caption, which leaves the
        background out UNNAMED_BACKGROUND_FRACTION of the time."""
        if name_background is None:
            name_background = rng.random() >= UNNAMED_BACKGROUND_FRACTION
        background = scene.background.describe()
        if scene.figure is not None:
            subject = scene.figure.describe(rng)
        else:
            parts = [s.describe(rng) for s in scene.shapes]
            subject = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        template = rng.choice(("{s} on {b}", "{s} on {b}", "on {b}, {s}", "{s}, {b}"))
        if not name_background:
            template = "{s}"
        return Scene(scene.height, scene.width, scene.frames, scene.background, scene.shapes, scene.figure,
                     template.format(s=subject, b=background))


# -- rendering

def shape_track(spec: ShapeSpec, frame: int, height: int, width: int) -> tuple[float, float, float]:
    """(centre x, centre y, radius) in pixels at `frame`."""
    t = frame / FPS
    x, y = spec.start[0] * width, spec.start[1] * height
    radius = spec.size * height
    if spec.motion in DIRECTIONS:
        dx, dy = DIRECTIONS[spec.motion]
        x, y = x + dx * spec.speed * width * t, y + dy * spec.speed * height * t
    elif spec.motion == "bounce":
        x = _reflect(x + spec.heading[0] * spec.speed * width * t, radius, width - radius)
        y = _reflect(y + spec.heading[1] * spec.speed * height * t, radius, height - radius)
    elif spec.motion == "grow":
        radius *= 1 + 1.2 * t
    elif spec.motion == "shrink":
        radius *= max(0.25, 1 - 0.3 * t)
    return x, y, radius


def _reflect(value: float, low: float, high: float) -> float:
    span = high - low
    if span <= 0:
        return low
    phase = (value - low) % (2 * span)
    return low + (phase if phase <= span else 2 * span - phase)


def _polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]] | None:
    def ring(points: int, radii: tuple[float, ...], turn: float) -> list[tuple[float, float]]:
        return [(x + radii[i % len(radii)] * r * math.cos(turn + 2 * math.pi * i / points),
                 y + radii[i % len(radii)] * r * math.sin(turn + 2 * math.pi * i / points)) for i in range(points)]

    if shape == "square":
        return ring(4, (1.0,), math.pi / 4)
    if shape == "triangle":
        return ring(3, (1.15,), -math.pi / 2)
    if shape == "diamond":
        return ring(4, (1.15,), -math.pi / 2)
    if shape == "star":
        return ring(10, (1.25, 0.55), -math.pi / 2)
    if shape == "heart":  # two lobes and a point, drawn as one outline
        points = [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                            - math.cos(4 * t))) for t in (2 * math.pi * i / 32 for i in range(32))]
        return [(x + r * px / 15, y + r * (py + 2) / 15) for px, py in points]
    if shape == "cross":
        w = r * 0.38
        return [(x - w, y - r), (x + w, y - r), (x + w, y - w), (x + r, y - w), (x + r, y + w), (x + w, y + w),
                (x + w, y + r), (x - w, y + r), (x - w, y + w), (x - r, y + w), (x - r, y - w), (x - w, y - w)]
    return None


def colour_rgb(name: str) -> tuple[int, int, int]:
    """A shape colour of the world or a novel one."""
    return SHAPE_COLOURS[name] if name in SHAPE_COLOURS else NOVEL_COLOURS[name]


def _draw_background(draw: ImageDraw.ImageDraw, background: Background, height: int, width: int) -> None:
    first = ALL_BACKGROUND_COLOURS[background.colours[0]]
    draw.rectangle([0, 0, width, height], fill=first)
    if len(background.colours) == 2:
        second = ALL_BACKGROUND_COLOURS[background.colours[1]]
        box = [width // 2, 0, width, height] if background.vertical_split else [0, height // 2, width, height]
        draw.rectangle(box, fill=second)


SUPERSAMPLE = 4  # shapes are drawn 4x larger and downsampled: smooth edges, sub-pixel motion


def render(scene: Scene) -> np.ndarray:
    """uint8 frames [T, H, W, 3]."""
    frames = []
    for index in range(scene.frames):
        s = SUPERSAMPLE
        canvas = Image.new("RGB", (scene.width * s, scene.height * s))
        draw = ImageDraw.Draw(canvas)
        _draw_background(draw, scene.background, scene.height * s, scene.width * s)
        for spec in scene.shapes:
            x, y, r = (v * s for v in shape_track(spec, index, scene.height, scene.width))
            colour = colour_rgb(spec.colour)
            polygon = _polygon(spec.shape, x, y, r)
            if polygon is None:
                draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
            else:
                draw.polygon(polygon, fill=colour)
        if scene.figure is not None:
            _draw_figure(draw, figure_keypoints(scene.figure, index, scene.height, scene.width), scene.figure.colour,
                         scene.height * s, scene.width * s)
        frames.append(np.asarray(canvas.resize((scene.width, scene.height), Image.Resampling.BOX)))
    return np.stack(frames)


# -- stick figures

# Keypoint offsets of a standing figure in units of its height (x right, y down from the neck), OpenPose order.
_REST = np.array([
    (0.0, -0.12), (0.0, 0.0), (-0.1, 0.0), (-0.12, 0.16), (-0.13, 0.31), (0.1, 0.0), (0.12, 0.16), (0.13, 0.31),
    (-0.06, 0.33), (-0.07, 0.51), (-0.07, 0.68), (0.06, 0.33), (0.07, 0.51), (0.07, 0.68),
    (-0.03, -0.14), (0.03, -0.14), (-0.05, -0.12), (0.05, -0.12)])
UPPER_ARM, FOREARM, THIGH, SHIN = 0.16, 0.15, 0.18, 0.17


def figure_keypoints(figure: FigureSpec, frame: int, height: int, width: int) -> np.ndarray:
    """[18, 3] keypoints (x, y normalised to the frame, confidence 1) of `figure` at `frame`."""
    t = frame / FPS
    wave = math.sin(2 * math.pi * figure.tempo * t + figure.phase)
    points = _REST.copy()
    arm_up = {"wave": 1.1 + 0.9 * wave, "walk": 0.25 * wave, "jump": 0.9 + 0.6 * wave,
              "dance": 0.8 + 0.8 * wave}[figure.action]
    elbow = {"wave": 0.6 * wave, "walk": 0.2, "jump": 0.2, "dance": -0.8 * wave}[figure.action]
    stride = {"wave": 0.05, "walk": 0.45 * wave, "jump": 0.15, "dance": 0.3 * wave}[figure.action]
    lift = {"wave": 0.0, "walk": 0.0, "jump": max(0.0, wave) * 0.12, "dance": 0.03 * abs(wave)}[figure.action]
    for side, (shoulder, elbow_i, wrist) in ((-1, (2, 3, 4)), (1, (5, 6, 7))):
        sway = arm_up if figure.action != "dance" else arm_up * (1 if side > 0 else 0.4)
        upper = math.pi / 2 - side * sway * 0.9  # angle from +x; pi/2 hangs down
        points[elbow_i] = points[shoulder] + UPPER_ARM * np.array([math.cos(upper), math.sin(upper)])
        lower = upper - side * elbow
        points[wrist] = points[elbow_i] + FOREARM * np.array([math.cos(lower), math.sin(lower)])
    for side, (hip, knee, ankle) in ((-1, (8, 9, 10)), (1, (11, 12, 13))):
        swing = math.pi / 2 + side * 0.08 + (stride if side > 0 else -stride) * 0.6
        points[knee] = points[hip] + THIGH * np.array([math.cos(swing), math.sin(swing)])
        points[ankle] = points[knee] + SHIN * np.array([math.cos(swing - 0.15 * side), math.sin(swing)])
    aspect = width / height
    centre_x = figure.centre_x + figure.drift * t
    neck_y = 0.5 - figure.height * 0.28 - lift
    xy = np.stack([centre_x + points[:, 0] * figure.height / aspect, neck_y + points[:, 1] * figure.height], 1)
    return np.concatenate([xy, np.ones((18, 1))], axis=1)


_FIGURE_LIMBS = [(1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
                 (8, 11), (1, 0)]


def _draw_figure(draw: ImageDraw.ImageDraw, keypoints: np.ndarray, colour: str, height: int, width: int) -> None:
    fill = SHAPE_COLOURS[colour]
    xy = keypoints[:, :2] * np.array([width, height])
    thickness = max(2, round(height * 0.045))
    for a, b in _FIGURE_LIMBS:
        draw.line([tuple(xy[a]), tuple(xy[b])], fill=fill, width=thickness)
    head = height * 0.075
    x, y = xy[0]
    draw.ellipse([x - head, y - head, x + head, y + head], fill=fill)


def pose_frames(scene: Scene) -> np.ndarray:
    """The scene's skeleton rendered as the pose tab and DWPose draw it: uint8 [T, H, W, 3]."""
    if scene.figure is None:
        raise ValueError("pose_frames needs a stick-figure scene")
    return np.stack([draw_pose(PoseFrame(bodies=[figure_keypoints(scene.figure, i, scene.height, scene.width)]),
                               scene.width, scene.height) for i in range(scene.frames)])
