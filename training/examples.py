"""Writes the shapes model's demo examples (configs/tiny.yaml, demo.examples_dir) from the
synthetic world: first frames of held-out scenes for image-to-video, and a stick figure with its
rendered pose video for the pose tab. A file's stem is its caption (the UI's example prompt).
With --concept it writes the fine-tuning example instead: clips of a concept the world does not
have (a magenta heart), each `clip.mp4` with its caption in `clip.txt`, as training.prepare reads them.

    python -m training.examples [--out assets/examples/shapes]
    python -m training.examples --concept --out assets/examples/finetune
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from PIL import Image

from pipelines.cli_options import HelpFormatter
from pipelines.loading.video_io import H264Writer

from .synthetic import FPS, Scene, SyntheticWorld, pose_frames, render

log = logging.getLogger("training.examples")
FOLDER = Path(__file__).resolve().parent.parent / "assets" / "examples" / "shapes"
CONCEPT_FOLDER = FOLDER.parent / "finetune"
CONCEPT_FRAMES = 33  # the tiny config's 3 blocks of 3 latent frames


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


def write_concept_clips(folder: Path = CONCEPT_FOLDER, count: int = 12, seed: int = 0) -> list[Path]:
    """`count` clips of SyntheticWorld.concept_scene (directions in turn) as clip-NN.mp4 + clip-NN.txt."""
    world = SyntheticWorld(seed, CONCEPT_FRAMES)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(count):
        scene = world.concept_scene(index)
        path = folder / f"clip-{index:02d}.mp4"
        with H264Writer(path, scene.width, scene.height, FPS) as writer:
            writer.write(render(scene))
        path.with_suffix(".txt").write_text(scene.caption + "\n")
        written += [path, path.with_suffix(".txt")]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.examples", formatter_class=HelpFormatter,
                                     description=__doc__)
    parser.add_argument("--out", type=Path, help=f"folder (default: {FOLDER}, or {CONCEPT_FOLDER} with --concept)")
    parser.add_argument("--concept", action="store_true", help="write the fine-tuning example's clips")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    written = (write_concept_clips(args.out or CONCEPT_FOLDER) if args.concept
               else write_examples(args.out or FOLDER))
    for path in written:
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
