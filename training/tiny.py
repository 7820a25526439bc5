"""Trains the tiny shapes model from scratch on the synthetic world, with this project's trainer.

    python -m training.tiny --out runs/tiny [--seed 0] [--install]

Stages (each is skipped when its output exists, so a stopped run continues where it was):
  1. caption encoder: the byte-level UMT5 learns to read the world's captions (training/caption_encoder.py)
  2. VAE: a tiny AutoencoderKLWan, reconstruction + KL on rendered clips (training/autoencoder.py)
  3. data: rendered clips encoded to latents + prompt embeddings, skeletons for the stick figures
  4. generator + pose encoders: `training.train --full --pose` (configs/tiny_train.yaml) from a seeded
     random init, at the few-step sampler's noise levels, with text-, image- and pose-conditioned steps
  5. the folder OUT/model (diffusers layout + pose_encoders.safetensors) is what configs/tiny_shapes.yaml reads;
     --install copies it to assets/tiny_shapes. OUT/evaluation.json scores the held-out prompts.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.cli_options import HelpFormatter

from .synthetic import CLIP_FRAMES

log = logging.getLogger("training.tiny")
MODEL_CONFIG = "configs/tiny_shapes.yaml"
TRAIN_CONFIG = "configs/tiny_train.yaml"
BUNDLE = Path(__file__).resolve().parent.parent / "assets" / "tiny_shapes"
VAE_CLIPS = 800  # rendered clips the VAE's training windows are cut from
VAE_WINDOW = 5   # frames per window: a causal first frame (what image-to-video encodes) + one 4-frame latent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.tiny", formatter_class=HelpFormatter,
                                     description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="work folder (model/, data/, run/, reports)")
    parser.add_argument("--data", type=Path, help="where the rendered training clips are cached (default: OUT/data; "
                                                  "they are re-rendered when missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clips", type=int, default=5000, help="training clips rendered for the generator")
    parser.add_argument("--caption-steps", type=int, default=1000)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch", type=int, default=48, help="5-frame windows per VAE step (a step costs about "
                                                                  "the same at 16 or 48: the causal VAE loops over "
                                                                  "frames)")
    parser.add_argument("--caption-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, help="generator steps (default: configs/tiny_train.yaml)")
    parser.add_argument("--workers", type=int, default=min(16, multiprocessing.cpu_count()),
                        help="processes rendering clips")
    parser.add_argument("--max-minutes", type=float, help="time budget of this command: the generator stage pauses "
                                                          "with a checkpoint when it runs out (rerun the same "
                                                          "command to continue)")
    parser.add_argument("--skip-evaluation", action="store_true", help="leave out the held-out scores")
    parser.add_argument("--install", action="store_true", help=f"copy the finished model to {BUNDLE}")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is there")
    return parser


# -- stage 0: the model folder and its untrained parts

def model_config():
    from pipelines.config import load_config

    config = load_config(MODEL_CONFIG)
    config.weights.bundled_dir = None
    return config


def initial_components(seed: int):
    """Tokenizer, UMT5, VAE and generator of the tiny architecture with seeded random weights."""
    from pipelines.weights import load_components

    config = model_config()
    config.weights.layout, config.weights.random_seed = "random", seed
    return load_components(config)


def save_generator(generator: torch.nn.Module, folder: Path) -> None:
    """The generator as a diffusers-layout transformer folder (weights + the config the inspector reads)."""
    from .adapters import save_module

    save_module(generator, folder / "diffusion_pytorch_model.safetensors")
    cfg = generator.config
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanTransformer3DModel", "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.dim // cfg.num_heads, "num_layers": cfg.num_layers, "in_channels": cfg.in_dim,
        "out_channels": cfg.out_dim, "ffn_dim": cfg.ffn_dim, "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim},
        indent=2))


# -- rendering in worker processes

def _render(args: tuple[int, int, int]) -> tuple[int, str, np.ndarray, np.ndarray | None]:
    from .synthetic import SyntheticWorld, pose_frames, render

    seed, frames, index = args
    scene = SyntheticWorld(seed, frames).scene(index)
    return index, scene.caption, render(scene), pose_frames(scene) if scene.figure is not None else None


def rendered(seed: int, frames: int, indices, workers: int):
    """(index, caption, frames, poses) for each index, rendered in parallel, in order."""
    jobs = [(seed, frames, i) for i in indices]
    if workers <= 1:
        yield from map(_render, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_render, jobs, chunksize=16)


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> [1, 3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0


# -- stages

def train_captions(components, args: argparse.Namespace, model_dir: Path, device: torch.device) -> None:
    from .caption_encoder import train_caption_encoder
    from .synthetic import SyntheticWorld

    accuracy = train_caption_encoder(components.prompt_encoder, SyntheticWorld(args.seed), args.caption_steps,
                                     args.caption_batch, 2e-3, device)
    components.prompt_encoder.model.cpu().save_pretrained(model_dir / "text_encoder")
    components.prompt_encoder.tokenizer.save_pretrained(model_dir / "tokenizer")
    log.info("caption encoder: token accuracy %.3f", accuracy)


def train_vae(components, args: argparse.Namespace, model_dir: Path, device: torch.device) -> dict:
    from .autoencoder import set_latent_statistics, train_autoencoder

    pool: dict[tuple[int, int], list[np.ndarray]] = {}
    for _, _, frames, _ in rendered(args.seed + 1, CLIP_FRAMES, range(min(VAE_CLIPS, args.clips)), args.workers):
        pool.setdefault(frames.shape[1:3], []).append(frames)
    sizes = sorted(pool, key=lambda size: -len(pool[size]))

    def batch(step: int) -> torch.Tensor:
        rng = random.Random(step)
        clips = pool[rng.choices(sizes, weights=[len(pool[s]) for s in sizes])[0]]
        windows = []
        for _ in range(args.vae_batch):
            clip = rng.choice(clips)
            start = rng.randrange(0, len(clip) - VAE_WINDOW + 1)
            windows.append(to_pixels(clip[start:start + VAE_WINDOW]))
        return torch.cat(windows)

    model = components.vae.model
    psnr = train_autoencoder(model, batch, args.vae_steps, 1e-3, 1e-4, device)
    set_latent_statistics(model, [batch(10**6 + i) for i in range(8)])
    model.cpu().save_pretrained(model_dir / "vae")
    return {"vae_psnr_db": float(np.mean(psnr[-50:]))}


@torch.no_grad()
def prepare_data(args: argparse.Namespace, model_dir: Path, data_dir: Path, device: torch.device) -> None:
    """Renders the training clips and caches them as training.prepare does (latents, prompts, poses)."""
    from pipelines.weights import load_components

    from .data import MANIFEST, ClipRecord, ShardWriter, read_manifest
    from .prepare import caption_embedding, pose_tensors

    vae_file = model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    manifest = data_dir / MANIFEST
    if len(read_manifest(data_dir)) == args.clips and manifest.stat().st_mtime > vae_file.stat().st_mtime:
        log.info("%s already holds the %d clips, encoded with this VAE", data_dir, args.clips)
        return
    if data_dir.exists():
        shutil.rmtree(data_dir)
    components = load_components(model_config(), model_dir, device)
    vae, encoder = components.vae, components.prompt_encoder
    writer = ShardWriter(data_dir, clips_per_shard=256)
    pending: dict[tuple[int, int], list] = {}

    def flush(size: tuple[int, int]) -> None:
        group = pending.pop(size, [])
        if not group:
            return
        latents = vae.encode(torch.cat([to_pixels(frames) for _, _, frames, _ in group]).to(device))
        for (index, caption, frames, poses), latent in zip(group, latents):
            tensors = {"latents": latent.cpu(), "prompt": caption_embedding(encoder, caption, device).cpu()}
            if poses is not None:
                tensors.update(pose_tensors(poses))
            writer.add(ClipRecord(f"synthetic-{index:06d}", "synthetic", 0.0, len(frames), caption, ""), tensors)

    started = time.perf_counter()
    for item in rendered(args.seed, CLIP_FRAMES, range(args.clips), args.workers):
        size = item[2].shape[1:3]
        pending.setdefault(size, []).append(item)
        if len(pending[size]) == 64:
            flush(size)
    for size in list(pending):
        flush(size)
    writer.flush()
    log.info("%d clips cached in %s (%.0f s)", args.clips, data_dir, time.perf_counter() - started)


def train_generator(args: argparse.Namespace, model_dir: Path, data_dir: Path, run_dir: Path,
                    minutes_left: float | None) -> dict:
    """Runs (or continues) the trainer; the model folder gets the generator and pose encoders when it finishes."""
    from . import train

    argv = ["--config", TRAIN_CONFIG, "--data", str(data_dir), "--out", str(run_dir), "--weights", str(model_dir),
            "--full", "--pose"]
    if list((run_dir / "checkpoints").glob("step-*")):
        argv += ["--resume", "latest"]
    if args.steps:
        argv += ["--max-steps", str(args.steps)]
    if args.cpu:
        argv += ["--cpu"]
    if minutes_left is not None:
        argv += ["--max-minutes", f"{max(minutes_left, 0.1):.2f}"]
    for stale in (run_dir / "generator.safetensors", run_dir / "checkpoints" / "pose_encoders.safetensors"):
        stale.unlink(missing_ok=True)
    train.main(argv)
    if not (run_dir / "generator.safetensors").exists():
        return {"generator_paused": True}
    shutil.copy(run_dir / "generator.safetensors", model_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    shutil.copy(run_dir / "checkpoints" / "pose_encoders.safetensors", model_dir / "pose_encoders.safetensors")
    return {"generator_paused": False}


def main(argv: list[str] | None = None) -> int:
    from .train import load_training_config

    args = build_parser().parse_args(argv)
    command_started = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.backends.cudnn.benchmark = True  # the VAE's 3D convolutions see a handful of fixed shapes
    out = args.out
    model_dir, data_dir, run_dir = out / "model", args.data or out / "data", out / "run"
    model_dir.mkdir(parents=True, exist_ok=True)
    report_path = out / "training.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"seed": args.seed, "seconds": {}}

    def timed(name: str, stage) -> None:
        started = time.perf_counter()
        result = stage()
        report["seconds"][name] = report["seconds"].get(name, 0) + round(time.perf_counter() - started, 1)
        report.update(result or {})
        report_path.write_text(json.dumps(report, indent=2))

    components = initial_components(args.seed)
    if not (model_dir / "transformer" / "config.json").exists():
        save_generator(components.generator, model_dir / "transformer")
    if not (model_dir / "text_encoder" / "config.json").exists():
        timed("caption_encoder", lambda: train_captions(components, args, model_dir, device))
    if not (model_dir / "vae" / "config.json").exists():
        timed("vae", lambda: train_vae(components, args, model_dir, device))
    if not (model_dir / "pose_encoders.safetensors").exists():
        timed("data", lambda: prepare_data(args, model_dir, data_dir, device))
        elapsed = (time.perf_counter() - command_started) / 60
        minutes_left = None if args.max_minutes is None else args.max_minutes - elapsed
        timed("generator", lambda: train_generator(args, model_dir, data_dir, run_dir, minutes_left))
        if report["generator_paused"]:
            log.info("generator training paused (--max-minutes): run the same command again to continue")
            return 0
    report.update({"clips": args.clips, "caption_steps": args.caption_steps, "vae_steps": args.vae_steps,
                   "generator_steps": args.steps or load_training_config(TRAIN_CONFIG)["max_steps"],
                   "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
    report_path.write_text(json.dumps(report, indent=2))
    if not args.skip_evaluation:
        from .scorecard import evaluate_model

        timed("evaluation", lambda: {"evaluation": evaluate_model(model_dir, device)})
    if args.install:
        if BUNDLE.exists():
            shutil.rmtree(BUNDLE)
        shutil.copytree(model_dir, BUNDLE)
        (BUNDLE / "training.json").write_text(json.dumps(report, indent=2))
        log.info("installed %s", BUNDLE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
