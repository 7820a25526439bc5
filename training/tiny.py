"""Trains the tiny shapes model from scratch on the synthetic world, with this project's trainer.

    python -m training.tiny --out runs/tiny [--seed 0] [--install]

Stages (each is skipped when its output exists, so a stopped run continues where it was):
  1. caption encoder: a word-level tokenizer over the world's words, and the UMT5 learns to read the world's captions (training/caption_encoder.py)
  2. VAE: a tiny AutoencoderKLWan, reconstruction + KL on rendered clips (training/autoencoder.py)
  3. data: rendered clips encoded to latents + prompt embeddings, skeletons for the stick figures
  4. teacher + pose encoders: `training.train --full --pose` (configs/tiny_teacher.yaml), flow matching from a
     seeded random init with text-, image- and pose-conditioned steps
  5. teacher paths: the teacher samples every clip's prompt with many Euler steps (training/distill.py)
  6. student: `training.train --full --pose` (configs/tiny_train.yaml) regresses the few-step generator onto
     those paths, so that the app's own 4-step sampler gives sharp videos
  7. the folder OUT/model (diffusers layout + pose_encoders.safetensors) is what configs/tiny.yaml reads;
     --install copies it to assets/tiny_shapes, with the teacher beside it as teacher.safetensors (bf16: the
     model fine-tuning adapts first, configs/tiny_multistep.yaml). OUT/training.json records times and scores.

--from DIR starts from a trained model folder instead of random weights (its caption encoder, VAE and
generator); with --teacher-only the command stops after the teacher (stages 3-4), which then starts from that
generator: how the shipped teacher was made again from the shipped student when it had not been kept.

--from DIR --continue carries every trained part of DIR over to a world that grew (new background
colours, captions that leave the background out): the caption encoder learns the new words (a word it
knew keeps its embedding) and the VAE the new pictures, and the teacher continues from DIR's
teacher.safetensors, each at a third of its learning rate and with the step counts given (--caption-steps,
--vae-steps, --vae-long-steps, --teacher-steps). The student is distilled afresh from the continued teacher
(stages 5-6 as above): run side by side on one H200, a student started from DIR's own generator reached
twice the regression loss on the new teacher's paths (bench/results/NOTES.md, "The world's blind spots").
"""
from __future__ import annotations

import argparse
import dataclasses
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

from .config import TrainingConfig, load_training_config
from .synthetic import CLIP_FRAMES, SyntheticWorld, render

log = logging.getLogger("training.tiny")
MODEL_CONFIG = "configs/tiny.yaml"
TEACHER_CONFIG = "configs/tiny_teacher.yaml"
TRAIN_CONFIG = "configs/tiny_train.yaml"
BUNDLE = Path(__file__).resolve().parent.parent / "assets" / "tiny_shapes"
TEACHER_FILE = "teacher.safetensors"  # the teacher's generator inside the bundle (configs/tiny_multistep.yaml)
VAE_CLIPS = 800  # rendered clips the VAE's training windows are cut from
VAE_HELD_OUT_CLIPS = 12  # held-out scenes its reconstructions are scored on
CONTINUED_LEARNING_RATE = 1 / 3  # of each stage's own, when --continue carries trained weights over
CAPTION_LEARNING_RATE = 2e-3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.tiny", formatter_class=HelpFormatter,
                                     description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="work folder (model/, data/, run/, reports)")
    parser.add_argument("--data", type=Path, help="where the rendered training clips are cached (default: OUT/data; "
                                                  "they are re-rendered when missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clips", type=int, default=5000, help="training clips rendered for the generator")
    parser.add_argument("--caption-steps", type=int, default=2500)
    parser.add_argument("--vae-steps", type=int, default=1500, help="VAE steps on 5-frame windows")
    parser.add_argument("--vae-long-steps", type=int, default=400, help="VAE steps on whole clips after those")
    parser.add_argument("--vae-long-batch", type=int, default=16, help="whole clips per step of that phase")
    parser.add_argument("--vae-foreground-weight", type=float, default=10.0,
                        help="extra weight of shape pixels in that phase's reconstruction loss")
    parser.add_argument("--vae-batch", type=int, default=48, help="windows per VAE step (a step costs about the same "
                                                                  "at 16 or 48: the causal VAE loops over frames)")
    parser.add_argument("--caption-batch", type=int, default=256)
    parser.add_argument("--teacher-config", default=TEACHER_CONFIG, help="the teacher's training YAML")
    parser.add_argument("--teacher-steps", type=int, help="teacher steps (default: the teacher config's max_steps)")
    parser.add_argument("--student-steps", type=int, help="student steps (default: configs/tiny_train.yaml)")
    parser.add_argument("--workers", type=int, default=min(16, multiprocessing.cpu_count()),
                        help="processes rendering clips")
    parser.add_argument("--max-minutes", type=float, help="time budget of this command: the teacher or student "
                                                          "stage pauses with a checkpoint when it runs out (rerun "
                                                          "the same command to continue)")
    parser.add_argument("--skip-evaluation", action="store_true", help="leave out the held-out scores")
    parser.add_argument("--from", dest="start_from", type=Path,
                        help="a trained model folder to start from (e.g. assets/tiny_shapes) instead of random weights")
    parser.add_argument("--continue", dest="continue_from", action="store_true",
                        help="with --from: fine-tune that model's caption encoder, VAE and teacher on this world and "
                             "distil the student afresh, instead of keeping its caption encoder and VAE and "
                             "starting the teacher from its student")
    parser.add_argument("--teacher-only", action="store_true",
                        help="stop after the teacher; --install then installs only the teacher")
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
    from pipelines.loading.weights import load_components

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

def train_captions(args: argparse.Namespace, model_dir: Path, device: torch.device, start: Path | None) -> dict:
    """A fresh UMT5 of the config's size over the world's words (transformers' own T5 initialisation,
    which scales the attention for T5's unscaled dot products), trained to read the captions; or the one in
    `start`, grown to the world's words and trained on (its new heads alone first)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    from pipelines.loading.text_encoder import PromptEncoder, umt5_config

    from .caption_encoder import grown_to_world, train_caption_encoder, world_tokenizer

    size = model_config().text_encoder
    torch.manual_seed(args.seed)
    if start is None:
        tokenizer = world_tokenizer()
        model = UMT5EncoderModel(umt5_config(len(tokenizer), size["d_model"], size["d_kv"], size["d_ff"],
                                             size["num_layers"], size["num_heads"]))
        learning_rate, heads_first = CAPTION_LEARNING_RATE, 0
    else:
        model = UMT5EncoderModel.from_pretrained(start / "text_encoder")
        tokenizer = grown_to_world(AutoTokenizer.from_pretrained(start / "tokenizer"), model)
        learning_rate, heads_first = CAPTION_LEARNING_RATE * CONTINUED_LEARNING_RATE, args.caption_steps // 4
    encoder = PromptEncoder(tokenizer, model, size["text_len"])
    accuracy = train_caption_encoder(encoder, SyntheticWorld(args.seed), args.caption_steps, args.caption_batch,
                                     learning_rate, device, heads_first=heads_first)
    model.cpu().save_pretrained(model_dir / "text_encoder")
    tokenizer.save_pretrained(model_dir / "tokenizer")
    log.info("caption encoder: token accuracy %.3f", accuracy)
    return {"caption_token_accuracy": round(accuracy, 3)}


def train_vae(model, args: argparse.Namespace, out: Path, model_dir: Path, device: torch.device,
              learning_rate_factor: float = 1.0) -> dict:
    """Trains the AutoencoderKLWan `model` in two phases: many cheap steps on 5-frame windows (the causal
    first frame and the latent after it), then fewer on whole clips. The causal caches carry features from
    latent to latent, so a VAE that never decoded more than a few latents in a row drifts on the later ones
    (trained on 5- and 9-frame windows, it reconstructed frames 0-4 at ~30 dB and frames 8-36 at ~14 dB);
    the first phase's result is kept in OUT/vae_short."""
    from diffusers import AutoencoderKLWan

    from pipelines.loading.vae import to_uint8_frames

    from .autoencoder import clip_psnr, reconstruct, set_latent_statistics, train_autoencoder
    from .evaluate import track_blob

    pool: dict[tuple[int, int], list[np.ndarray]] = {}
    for _, _, frames, _ in rendered(args.seed + 1, CLIP_FRAMES, range(min(VAE_CLIPS, args.clips)), args.workers):
        pool.setdefault(frames.shape[1:3], []).append(frames)
    sizes = sorted(pool, key=lambda size: -len(pool[size]))

    def windows(length: int, batch_size: int):
        def batch(step: int) -> torch.Tensor:
            rng = random.Random(step)
            clips = pool[rng.choices(sizes, weights=[len(pool[s]) for s in sizes])[0]]
            picked = []
            for _ in range(batch_size):
                clip = rng.choice(clips)
                start = rng.randrange(0, len(clip) - length + 1)
                picked.append(to_pixels(clip[start:start + length]))
            return torch.cat(picked)
        return batch

    short_dir = out / "vae_short"
    if (short_dir / "config.json").exists():
        model.load_state_dict(AutoencoderKLWan.from_pretrained(short_dir).state_dict())
        log.info("VAE short-window phase from %s", short_dir)
    else:
        train_autoencoder(model, windows(5, args.vae_batch), args.vae_steps, 1e-3 * learning_rate_factor, 1e-4,
                          device)
        model.cpu().save_pretrained(short_dir)
    whole_clips = windows(CLIP_FRAMES, args.vae_long_batch)
    psnr = train_autoencoder(model, whole_clips, args.vae_long_steps, 3e-4 * learning_rate_factor, 1e-4, device,
                             log_every=50, foreground_weight=args.vae_foreground_weight)
    set_latent_statistics(model, [whole_clips(10**6 + i) for i in range(4)])
    world = SyntheticWorld(args.seed)
    scenes = [world.held_out_scene(i) for i in range(VAE_HELD_OUT_CLIPS)]
    originals = [to_pixels(render(scene)) for scene in scenes]
    reconstructions = [reconstruct(model, pixels) for pixels in originals]
    first, every = clip_psnr(originals, reconstructions)
    # what the T2V acceptance needs of any generated video, asked of the VAE's own reconstructions
    colour_found = float(np.mean([track_blob(to_uint8_frames(decoded), scene.shapes[0].colour).found
                                  for scene, decoded in zip(scenes, reconstructions)]))
    log.info("VAE on held-out clips: first frame %.1f dB, all frames %.1f dB, the shape's colour found in %.0f %%",
             first, every, 100 * colour_found)
    model.cpu().save_pretrained(model_dir / "vae")
    return {"vae_psnr_db": float(np.mean(psnr[-50:])), "vae_held_out_first_frame_psnr_db": first,
            "vae_held_out_psnr_db": every, "vae_held_out_colour_found": colour_found}


@torch.no_grad()
def prepare_data(args: argparse.Namespace, model_dir: Path, data_dir: Path, device: torch.device) -> None:
    """Renders the training clips and caches them as training.prepare does (latents, prompts, poses)."""
    from pipelines.loading.weights import load_components

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


def run_trainer(args: argparse.Namespace, config: TrainingConfig, data_dir: Path, run_dir: Path, weights_dir: Path,
                minutes_left: float | None) -> bool:
    """Runs (or continues) the trainer on every generator weight and the pose encoders (what
    `training.train --full --pose` does); True once it wrote its final weights."""
    from .train import Trainer, TrainRun

    resume = "latest" if list((run_dir / "checkpoints").glob("step-*")) else None
    for stale in (run_dir / "generator.safetensors", run_dir / "checkpoints" / "pose_encoders.safetensors"):
        stale.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = TrainRun(data_dir, run_dir, weights_dir, full=True, pose=True, resume=resume,
                   max_minutes=None if minutes_left is None else max(minutes_left, 0.1), cpu=args.cpu)
    Trainer(run, config).train()
    return (run_dir / "generator.safetensors").exists()


def install_teacher(teacher_dir: Path, bundle: Path) -> Path:
    """The teacher's generator beside the student, in bf16 (half the bytes in git; it is sampled in float32)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(teacher_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    path = bundle / TEACHER_FILE
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(path))
    return path


def install_generator(run_dir: Path, model_dir: Path) -> None:
    """A finished run's generator and pose encoders into a model folder."""
    shutil.copy(run_dir / "generator.safetensors", model_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    shutil.copy(run_dir / "checkpoints" / "pose_encoders.safetensors", model_dir / "pose_encoders.safetensors")


@torch.no_grad()
def record_teacher_paths(args: argparse.Namespace, teacher_dir: Path, data_dir: Path, paths_dir: Path,
                         device: torch.device) -> dict:
    """The teacher's videos for every training clip, with their ODE paths (training/distill.py)."""
    from pipelines.loading.weights import load_components, read_state
    from pipelines.pose.condition import PoseEncoders

    from .distill import distill_dataset
    from .objective import few_step_sigmas
    from .train import FlowStep, empty_prompt

    config = model_config()
    components = load_components(config, teacher_dir, device)
    generator = components.generator.float()
    encoders = PoseEncoders(generator.config.dim)
    encoders.load_state_dict(read_state(teacher_dir / "pose_encoders.safetensors"))
    teacher = FlowStep(generator, config.frames_per_block, generator.config.text_len, encoders).to(device).eval()
    sigmas = few_step_sigmas(config.sampler)
    settings = load_training_config(TRAIN_CONFIG).distill
    if paths_dir.exists():
        shutil.rmtree(paths_dir)
    unconditional = empty_prompt(components.prompt_encoder, generator.config.text_len)
    count = distill_dataset(teacher, data_dir, paths_dir, sigmas, settings.teacher_steps, settings.guidance,
                            settings.image_to_video, unconditional, args.seed)
    return {"teacher_paths": count}


def evaluate_teacher(teacher_dir: Path, device: torch.device) -> dict:
    """The teacher's held-out scores with the many-step guided sampler its paths are recorded with."""
    from .scorecard import evaluate_model

    settings = load_training_config(TRAIN_CONFIG).distill
    return evaluate_model(teacher_dir, device, sampler={
        "kind": "multi_step", "solver": "euler", "num_steps": settings.teacher_steps,
        "guidance_scale": settings.guidance, "timestep_shift": 1.0})


def paths_recorded(paths_dir: Path, data_dir: Path, teacher_dir: Path) -> bool:
    """Whether paths_dir holds a path for every clip, recorded with the current teacher."""
    from .data import MANIFEST, read_manifest

    manifest, teacher_file = paths_dir / MANIFEST, teacher_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    return (manifest.exists() and len(read_manifest(paths_dir)) == len(read_manifest(data_dir))
            and manifest.stat().st_mtime > teacher_file.stat().st_mtime)


def stage_config(path: str, steps: int | None, **overrides) -> TrainingConfig:
    """A stage's training YAML with the command's step count (None: the file's)."""
    return load_training_config(path, max_steps=steps, **overrides)


def continued(config: TrainingConfig) -> TrainingConfig:
    """A stage's config for weights that are already trained: a third of the learning rate, a short warm-up."""
    return dataclasses.replace(config, learning_rate=config.learning_rate * CONTINUED_LEARNING_RATE,
                               warmup_steps=min(config.warmup_steps, max(1, config.max_steps // 20)))


def continued_teacher(start: Path, model_dir: Path, folder: Path) -> Path:
    """A weights folder holding the new world's caption encoder and VAE with start's teacher generator
    (float32), for the teacher to continue from."""
    from safetensors.torch import load_file, save_file

    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(model_dir, folder)
    state = load_file(str(start / TEACHER_FILE))
    save_file({k: v.float().contiguous() for k, v in state.items()},
              str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    return folder


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.continue_from and not args.start_from:
        log.error("--continue needs --from: the model whose parts continue")
        return 2
    command_started = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.backends.cudnn.benchmark = True  # the VAE's 3D convolutions see a handful of fixed shapes
    out = args.out
    model_dir, data_dir = out / "model", args.data or out / "data"
    model_dir.mkdir(parents=True, exist_ok=True)
    report_path = out / "training.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"seed": args.seed, "seconds": {}}

    def timed(name: str, stage) -> None:
        started = time.perf_counter()
        result = stage()
        report["seconds"][name] = report["seconds"].get(name, 0) + round(time.perf_counter() - started, 1)
        report.update(result or {})
        report_path.write_text(json.dumps(report, indent=2))

    start = args.start_from if args.continue_from else None
    if args.start_from and not start and not (model_dir / "transformer" / "config.json").exists():
        shutil.copytree(args.start_from, model_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(TEACHER_FILE))
    components = initial_components(args.seed)
    if not (model_dir / "transformer" / "config.json").exists():
        save_generator(components.generator, model_dir / "transformer")
    if not (model_dir / "text_encoder" / "config.json").exists():
        timed("caption_encoder", lambda: train_captions(args, model_dir, device, start))
    if not (model_dir / "vae" / "config.json").exists():
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(start / "vae") if start else components.vae.model
        factor = CONTINUED_LEARNING_RATE if start else 1.0
        timed("vae", lambda: train_vae(vae, args, out, model_dir, device, factor))
    teacher_dir, paths_dir = out / "teacher", out / "paths"
    if not (model_dir / "pose_encoders.safetensors").exists() or args.teacher_only:
        def minutes_left() -> float | None:
            elapsed = (time.perf_counter() - command_started) / 60
            return None if args.max_minutes is None else args.max_minutes - elapsed

        if not (teacher_dir / "pose_encoders.safetensors").exists():
            timed("data", lambda: prepare_data(args, model_dir, data_dir, device))
            teacher_config, teacher_start = stage_config(args.teacher_config, args.teacher_steps), model_dir
            if start:  # the teacher continues from start's, with start's pose encoders (the teacher's own were
                # not kept beside it)
                teacher_start = continued_teacher(start, model_dir, out / "teacher_start")
                teacher_config = continued(stage_config(args.teacher_config, args.teacher_steps,
                                                        **{"pose.init": str(start / "pose_encoders.safetensors")}))
            timed("teacher", lambda: {"paused": not run_trainer(args, teacher_config, data_dir, out / "teacher_run",
                                                                teacher_start, minutes_left())})
            if report["paused"]:
                log.info("teacher training paused (--max-minutes): run the same command again to continue")
                return 0
            shutil.copytree(model_dir, teacher_dir, dirs_exist_ok=True)
            install_generator(out / "teacher_run", teacher_dir)
            if not args.skip_evaluation:
                timed("teacher_evaluation", lambda: {"teacher_evaluation": evaluate_teacher(teacher_dir, device)})
        if args.teacher_only:
            report_path.write_text(json.dumps(report, indent=2))
            if args.install:
                log.info("installed %s", install_teacher(teacher_dir, BUNDLE))
            return 0
        if not paths_recorded(paths_dir, data_dir, teacher_dir):
            timed("teacher_paths", lambda: record_teacher_paths(args, teacher_dir, data_dir, paths_dir, device))
        student = stage_config(TRAIN_CONFIG, args.student_steps,  # pose encoders start from the teacher's
                               **{"pose.init": str(teacher_dir / "pose_encoders.safetensors")})
        timed("student", lambda: {"paused": not run_trainer(args, student, paths_dir, out / "student_run", teacher_dir,
                                                            minutes_left())})
        if report["paused"]:
            log.info("student training paused (--max-minutes): run the same command again to continue")
            return 0
        install_generator(out / "student_run", model_dir)
    report.update({"clips": args.clips, "caption_steps": args.caption_steps, "vae_steps": args.vae_steps,
                   "vae_long_steps": args.vae_long_steps, "vae_long_batch": args.vae_long_batch,
                   "vae_foreground_weight": args.vae_foreground_weight,
                   "teacher_steps": stage_config(args.teacher_config, args.teacher_steps).max_steps,
                   "student_steps": stage_config(TRAIN_CONFIG, args.student_steps).max_steps,
                   "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
    report_path.write_text(json.dumps(report, indent=2))
    if not args.skip_evaluation:
        from .scorecard import evaluate_model

        timed("evaluation", lambda: {"evaluation": evaluate_model(model_dir, device)})
    if args.install:
        if BUNDLE.exists():
            shutil.rmtree(BUNDLE)
        shutil.copytree(model_dir, BUNDLE)
        install_teacher(teacher_dir, BUNDLE)
        (BUNDLE / "training.json").write_text(json.dumps(report, indent=2))
        log.info("installed %s", BUNDLE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
