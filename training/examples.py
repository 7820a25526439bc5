"""Writes the shapes model's demo examples (configs/tiny.yaml, demo.examples_dir) from the
synthetic world: first frames of held-out scenes for image-to-video, and a stick figure with its
rendered pose video for the pose tab. A file's stem is its caption (the UI's example prompt).

    python -m training.examples [--out assets/examples/shapes]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from PIL import Image

from pipelines.cli_options import HelpFormatter
from pipelines.video_io import H264Writer

from .synthetic import FPS, Scene, SyntheticWorld, pose_frames, render

log = logging.getLogger("training.examples")
FOLDER = Path(__file__).resolve().parent.parent / "assets" / "examples" / "shapes"


def stem(scene: Scene) -> str:
    return scene.caption.replace(" ", "_")


def plain_captions(scenes) -> list[Scene]:
    """Scenes whose caption reads '... on a ... background' (no comma: a clean file name)."""
    return [scene for scene in scenes if "," not in scene.caption]


def write_examples(folder: Path = FOLDER, images: int = 2, figures: int = 1) -> list[Path]:
    """The example files; the pose video holds the skeleton frames after the reference frame's, as the
    trainer aligns them."""
    world = SyntheticWorld(0)
    written = []
    for scene in plain_captions(world.held_out_scene(i) for i in range(20))[:images]:
        path = folder / f"{stem(scene)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render(scene)[0]).save(path)
        written.append(path)
    for scene in plain_captions(world.figure_scene_at(i) for i in range(20))[:figures]:
        reference = folder / "pose" / f"{stem(scene)}.png"
        reference.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render(scene)[0]).save(reference)
        skeletons = pose_frames(scene)[4:]
        with H264Writer(reference.with_suffix(".mp4"), scene.width, scene.height, FPS) as writer:
            writer.write(skeletons)
        written += [reference, reference.with_suffix(".mp4")]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.examples", formatter_class=HelpFormatter,
                                     description=__doc__)
    parser.add_argument("--out", type=Path, default=FOLDER)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for path in write_examples(args.out):
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
