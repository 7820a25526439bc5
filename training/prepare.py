"""Prepare fine-tuning data: videos + captions -> cached VAE latents and UMT5 prompt embeddings.

    python -m training.prepare --videos DIR --out DATA [--config configs/tiny.yaml]
        [--weights W] [--captions captions.csv] [--frames 81] [--stride 81] [--poses]

Videos are resampled to 16 fps, cut into clips of 4k+1 frames, resized to cover and centre-
cropped to the config's size, encoded once with the Wan VAE (captions once with UMT5) and stored
as safetensors shards with a manifest. A bad video is skipped with one log line; a second run
skips the clips already cached.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipelines.cli_options import HelpFormatter

from .data import (
    ClipRecord,
    ShardWriter,
    VideoError,
    cut_clips,
    decode_at_16fps,
    expected_clips,
    find_videos,
    probe,
    read_captions,
    read_manifest,
)

log = logging.getLogger("training.prepare")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.prepare", formatter_class=HelpFormatter,
                                     description=__doc__)
    parser.add_argument("--videos", type=Path, required=True, help="folder of source videos (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="data folder to write (or resume)")
    parser.add_argument("--config", default="configs/tiny.yaml", help="model whose VAE/UMT5 encode (default: the "
                                                                     "app's embedded tiny model)")
    parser.add_argument("--weights", help="weights folder of that model")
    parser.add_argument("--captions", type=Path, help="CSV or JSONL with path,caption (default: clip.txt sidecars)")
    parser.add_argument("--frames", type=int, help="frames per clip, 4k+1; default: the config's video "
                                                   "(81 for 7 blocks), plus one reference latent with --poses")
    parser.add_argument("--stride", type=int, help="frames between clip starts; default: --frames (no overlap)")
    parser.add_argument("--poses", action="store_true", help="also cache DWPose skeleton videos for pose training")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clips-per-shard", type=int, default=32)
    return parser


def default_frames(config, poses: bool) -> int:
    """The video length the trainer's blocks need (a reference frame in front for pose training)."""
    from pipelines.loading.vae import frames_for_latents

    return frames_for_latents(config.num_blocks * config.frames_per_block + (1 if poses else 0))


def prepare(videos_dir: Path, out: Path, pipeline, frames: int, stride: int, captions_file: Path | None = None,
            pose_detector: Callable[[np.ndarray], object] | None = None, clips_per_shard: int = 32) -> int:
    """Caches every clip not cached yet; returns how many clips were added."""
    from tqdm import tqdm

    from pipelines.core import prepare_image
    from pipelines.pose.draw import draw_pose

    if (frames - 1) % 4:
        raise ValueError(f"--frames must be 4k+1 (the VAE packs 4 frames per latent after the first), got {frames}")
    config = pipeline.config
    height, width = config.height, config.width
    done = {record.clip_id for record in read_manifest(out)}
    videos = find_videos(videos_dir)
    captions = read_captions(videos, captions_file)
    plans: list[tuple[Path, int]] = []
    for video in videos:
        if video not in captions:
            log.warning("skipped %s: no caption (add %s or a --captions file)", video, video.with_suffix(".txt").name)
            continue
        try:
            duration, _, _ = probe(video)
        except VideoError as err:
            log.warning("skipped %s: %s", video, err)
            continue
        plans.append((video, expected_clips(duration, frames, stride)))
    writer = ShardWriter(out, clips_per_shard)
    added = 0
    progress = tqdm(total=sum(n for _, n in plans), unit="clip", desc="clips")
    try:
        for video, _ in plans:
            try:
                decoded = decode_at_16fps(video)
                windows = list(cut_clips(decoded, frames, stride))
            except VideoError as err:
                log.warning("skipped %s: %s", video, err)
                continue
            prompt = caption_embedding(pipeline.prompt_encoder, captions[video], pipeline.device)
            for start, clip in windows:
                clip_id = f"{video.stem}-{start:05d}"
                if clip_id in done:
                    progress.update(1)
                    continue
                pixels = torch.cat([prepare_image(_image(frame), height, width) for frame in clip], dim=2)
                tensors = {"latents": pipeline.vae.encode(pixels.to(pipeline.device, pipeline.vae.dtype))[0],
                           "prompt": prompt}
                if pose_detector is not None:
                    fitted = ((pixels[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
                    tensors.update(pose_tensors(np.stack([draw_pose(pose_detector(frame), width, height)
                                                          for frame in fitted])))
                writer.add(ClipRecord(clip_id, str(video), start / 16.0, frames, captions[video], ""), tensors)
                added += 1
                progress.update(1)
    finally:
        writer.flush()
        progress.close()
    log.info("%d clips added to %s (%d cached in all)", added, out, len(read_manifest(out)))
    return added


def caption_embedding(encoder, caption: str, device: torch.device | str) -> torch.Tensor:
    """The caption's UMT5 embedding without its padding [tokens, d] (the trainer pads it again)."""
    prompt = encoder.encode(caption, device)[0]
    return prompt[:min(encoder.token_count(caption), prompt.shape[0])]


def pose_tensors(poses: np.ndarray) -> dict[str, torch.Tensor]:
    """A clip's rendered skeletons [T, H, W, 3] as the trainer reads them: the first frame is the
    reference's pose, the rest follow the frames after the reference latent's."""
    return {"pose": torch.from_numpy(np.ascontiguousarray(poses[4:])),
            "reference_pose": torch.from_numpy(np.ascontiguousarray(poses[0]))}


def _image(frame: np.ndarray):
    from PIL import Image

    return Image.fromarray(frame)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    from pipelines.builder import build_pipeline
    from pipelines.config import load_config
    from pipelines.loading.weights import WeightsError
    from pipelines.pose.extract import load_dwpose

    try:
        config = load_config(args.config)
        pipeline, _ = build_pipeline(config, args.weights, args.device)
        detector = load_dwpose(Path(args.weights) / "dwpose" if args.weights else None) if args.poses else None
    except WeightsError as err:
        log.error("%s", err)
        return 2
    frames = args.frames or default_frames(config, args.poses)
    with torch.no_grad():
        prepare(args.videos, args.out, pipeline, frames, args.stride or frames, args.captions, detector,
                args.clips_per_shard)
    return 0


if __name__ == "__main__":
    sys.exit(main())
