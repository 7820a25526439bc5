"""Fine-tune the causal generator on prepared clips: LoRA (default), all weights (--full), pose encoders (--pose).

    accelerate launch -m training.train --config configs/train_lora.yaml --data DATA --out OUT [--weights W]
    python -m training.train ...            (single process)

Each step runs the whole clip through the project's CausalWanModel in one pass with block-causal
attention and an independent noise level per 3-frame block (see training/objective.py); with
`loss: ode_regression` the data are a teacher's recorded paths instead (training/distill.py). Data
order and noise depend only on (seed, step), so --resume continues exactly where a run stopped.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.tracking import GeneralTracker
from torch import nn

from pipelines.cli_options import HelpFormatter

from .config import TrainingConfig, TrainingConfigError, load_training_config
from .data import collate

log = logging.getLogger("training.train")


class TrainingError(RuntimeError):
    """Training cannot start with these data or settings; the message says what to change."""


@dataclass
class TrainRun:
    """Where one training run reads and writes, and how it runs (the command line's options)."""
    data: Path
    out: Path
    weights: str | Path | None = None
    full: bool = False  # every generator weight instead of a LoRA
    pose: bool = False  # also the pose encoders
    resume: str | Path | None = None  # a checkpoint folder, or "latest"
    max_minutes: float | None = None
    cpu: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainRun":
        return cls(args.data, args.out, args.weights, args.full, args.pose, args.resume, args.max_minutes, args.cpu)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.train", formatter_class=HelpFormatter,
                                     description=__doc__)
    parser.add_argument("--config", default="configs/tiny_lora.yaml",
                        help="training YAML (default: the embedded tiny model's; configs/train_lora.yaml: real weights)")
    parser.add_argument("--data", type=Path, required=True, help="folder written by training.prepare")
    parser.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, logs, adapter)")
    parser.add_argument("--weights", help="weights folder of the model being fine-tuned")
    parser.add_argument("--full", action="store_true", help="train every generator weight instead of a LoRA")
    parser.add_argument("--pose", action="store_true", help="also train pose encoders (data prepared with --poses)")
    parser.add_argument("--resume", help="checkpoint folder to continue from, or 'latest'")
    parser.add_argument("--max-steps", type=int, help="override the config's max_steps")
    parser.add_argument("--max-minutes", type=float, help="stop with a checkpoint after this long (for time-limited "
                                                          "jobs); continue with --resume latest")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is there")
    return parser


class FlowStep(nn.Module):
    """Everything trained in one forward: prompt context, optional pose conditioning, the generator
    pass over the whole clip. One module, so data parallelism sees every use of every weight."""

    def __init__(self, generator: nn.Module, frames_per_block: int, text_len: int,
                 pose_encoders: nn.Module | None = None) -> None:
        super().__init__()
        self.generator = generator
        self.pose_encoders = pose_encoders
        self.frames_per_block = frames_per_block
        self.text_len = text_len

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: torch.Tensor, prefix_frames: int,
                poses: list | None = None, reference_poses: list | None = None,
                pose_condition: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """poses / reference_poses: per clip, its pose frames and reference pose, or None for a clip
        without poses (it gets no pose input, as image-to-video does at inference). pose_condition:
        what self.pose_condition returned for these clips, when calling again on the same clips."""
        from pipelines.model.kv_cache import BlockCausalLayout

        generator = self.generator
        context = generator.encode_context(prompts)
        frames, height, width = noisy.shape[2:]
        frame_tokens = generator.frame_tokens(height, width)
        blocks = [prefix_frames] * bool(prefix_frames) + [self.frames_per_block] * (
            (frames - prefix_frames) // self.frames_per_block)
        bias = None
        if pose_condition is None:
            pose_condition = self.pose_condition(noisy, prefix_frames, poses, reference_poses)
        if pose_condition is not None:
            references, tokens = pose_condition
            generated = (frames - prefix_frames) * frame_tokens
            noisy = torch.cat([noisy[:, :, :prefix_frames] + references, noisy[:, :, prefix_frames:]], 2)
            bias = torch.cat([tokens.new_zeros(tokens.shape[0], prefix_frames * frame_tokens, tokens.shape[2]),
                              tokens[:, :generated]], dim=1)
        return generator(noisy, timesteps, context, attn_mask=BlockCausalLayout.of(blocks, frame_tokens),
                         token_bias=bias)

    def sampling_context(self, prompts: torch.Tensor, empty: torch.Tensor, guidance: float, prefix_frames: int,
                         condition: tuple[torch.Tensor, torch.Tensor] | None, total_frames: int):
        """A KV-cached context for sampling this model block by block (distill.TeacherContext)."""
        from .distill import TeacherContext

        return TeacherContext(self.generator, self.frames_per_block, prompts, empty, guidance, prefix_frames,
                              condition, total_frames)

    def pose_condition(self, latents: torch.Tensor, prefix_frames: int, poses: list | None,
                       reference_poses: list | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(features added to the clean reference frame [B, C, 1, h, w], pose tokens of the frames after it
        [B, N, dim]) with zeros for clips without poses, or None when no clip has any. The clips with
        poses go through the encoders as one batch."""
        if self.pose_encoders is None or not prefix_frames or not poses or all(p is None for p in poses):
            return None
        encoders = self.pose_encoders
        posed = [i for i, pose in enumerate(poses) if pose is not None]
        references = latents.new_zeros(latents.shape[0], latents.shape[1], 1, *latents.shape[3:])
        references[posed] = encoders.reference_features(np.stack([reference_poses[i] for i in posed])).to(latents)
        posed_tokens = encoders.pose_tokens(np.stack([poses[i] for i in posed])).to(latents)
        tokens = latents.new_zeros(latents.shape[0], *posed_tokens.shape[1:])
        tokens[posed] = posed_tokens
        return references, tokens


def empty_prompt(encoder, text_len: int) -> torch.Tensor:
    """[text_len, d]: the embedding of "" padded as collate pads prompts."""
    from .prepare import caption_embedding

    embedding = caption_embedding(encoder, "", "cpu").float()
    padded = torch.zeros(text_len, embedding.shape[-1])
    padded[:len(embedding)] = embedding[:text_len]
    return padded


def flow_matching_loss(step_module: nn.Module, batch: dict, objective, frames_per_block: int, prefix_frames: int,
                       rng: torch.Generator, device: torch.device) -> torch.Tensor:
    """One training loss: per-block sigmas (clean prefix frames), noisy latents, velocity MSE."""
    from .objective import flow_loss, noisy_latents, position_weights, velocity_target

    x0 = batch["latents"]
    blocks = (x0.shape[2] - prefix_frames) // frames_per_block
    if blocks < 1:
        raise ValueError(f"clips of {x0.shape[2]} latent frames are too short for {prefix_frames} prefix frame(s) "
                         f"and one {frames_per_block}-frame block: prepare longer clips (--frames)")
    x0 = x0[:, :, :prefix_frames + blocks * frames_per_block]
    sigma, in_loss = objective.block_sigmas(x0.shape[0], blocks, rng)
    zeros = torch.zeros(x0.shape[0], prefix_frames)
    sigma_frames = torch.cat([zeros, sigma.repeat_interleave(frames_per_block, dim=1)], dim=1)
    weights = torch.cat([zeros, in_loss.float().repeat_interleave(frames_per_block, dim=1)], dim=1)
    noise = torch.randn(x0.shape, generator=rng)
    noisy = noisy_latents(x0, noise, sigma_frames)
    prediction = step_module(noisy.to(device), (sigma_frames * 1000).to(device), batch["prompts"].to(device),
                             prefix_frames, batch.get("poses"), batch.get("reference_poses"))
    positions = position_weights(x0, objective.foreground_weight) if objective.foreground_weight else None
    return flow_loss(prediction, velocity_target(x0, noise).to(device), weights.to(device), positions)


def same_size_groups(items: list[dict]) -> list[list[dict]]:
    """Clips of one latent size (and, in distilled data, one number of clean prefix frames) per group:
    a prepared folder may mix the config's resolutions."""
    groups: dict[tuple, list[dict]] = {}
    for item in items:
        key = (tuple(item["latents"].shape), int(item["prefix_frames"]) if "prefix_frames" in item else 0)
        groups.setdefault(key, []).append(item)
    return list(groups.values())


def sample_indices(step: int, micro: int, rank: int, world: int, batch: int, accum: int, size: int,
                   seed: int) -> list[int]:
    """Which clips a process trains on at (step, micro-step): a fresh seeded permutation per epoch,
    consumed in order, so the order depends only on the seed and the step (exact resumption)."""
    indices = []
    for j in range(batch):
        position = ((step * accum + micro) * world + rank) * batch + j
        epoch, offset = divmod(position, size)
        indices.append(int(epoch_order(size, seed, epoch)[offset]))
    return indices


@functools.lru_cache(maxsize=4)
def epoch_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def learning_rate_factor(step: int, warmup: int, total: int, kind: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class CSVTracker(GeneralTracker):
    """accelerate tracker writing logs/metrics.csv, used when TensorBoard is not installed."""

    name = "csv"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, logging_dir: str | Path) -> None:
        super().__init__()
        self.path = Path(logging_dir) / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self) -> "CSVTracker":
        return self

    def store_init_configuration(self, values: dict) -> None:
        (self.path.parent / "config.json").write_text(json.dumps(values, indent=2, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", *values])
            writer.writerow([step, *values.values()])


def make_tracker(out: Path) -> str | CSVTracker:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return CSVTracker(out / "logs")
    return "tensorboard"


class Trainer:
    """One training run: the model and optimiser are built at construction, train() runs the steps."""

    def __init__(self, run: TrainRun, cfg: TrainingConfig) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.run, self.cfg = run, cfg
        precision = cfg.mixed_precision
        use_cuda = torch.cuda.is_available() and not run.cpu
        if precision == "auto":
            precision = "bf16" if use_cuda else "no"
        self.accelerator = Accelerator(mixed_precision=precision, cpu=not use_cuda,
                                       gradient_accumulation_steps=cfg.gradient_accumulation,
                                       log_with=make_tracker(run.out),
                                       project_config=ProjectConfiguration(project_dir=str(run.out),
                                                                           logging_dir=str(run.out / "logs")))
        self.device = self.accelerator.device
        self._build_model()
        from .data import CachedClips
        from .objective import FlowObjective, few_step_sigmas

        try:
            self.data = CachedClips(run.data, in_memory=cfg.data_in_memory)
        except FileNotFoundError as err:
            raise TrainingError(str(err)) from err
        if run.pose and not self.data.has_poses:
            raise TrainingError(f"--pose needs clips prepared with --poses; {run.data} has none")
        self.sampler_sigmas = few_step_sigmas(self.model_config.sampler)
        if cfg.prompt_dropout > 0:  # the empty prompt, as classifier-free guidance's negative prompt "" reads
            self.empty_prompt = empty_prompt(self.components.prompt_encoder, self.step_module_unwrapped.text_len)
        self.objective = FlowObjective(**dataclasses.asdict(cfg.objective), few_step_sigmas=self.sampler_sigmas)
        if cfg.loss == "flow" and self.model_config.is_distilled and not run.full:
            log.warning("%s is a few-step (distilled) model: a LoRA trained by flow matching alone blurs what it "
                        "draws; python -m training.finetune adapts its teacher first (README 'Fine-tuning')",
                        Path(self.model_config.source).name)
        if cfg.loss == "ode_regression" and ("trajectory" not in self.data[0] or not self.sampler_sigmas):
            raise TrainingError(f"loss: ode_regression needs a few-step model config and a folder of teacher paths "
                                f"(training.distill.distill_dataset); {run.data} has none")
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.learning_rate, betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay)
        total = cfg.max_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: learning_rate_factor(s, cfg.warmup_steps, total, cfg.lr_schedule))
        self.step_module, self.optimizer, self.scheduler = self.accelerator.prepare(
            self.step_module, self.optimizer, self.scheduler)
        self.start_step = 0
        if run.resume:
            self.start_step = self.load_checkpoint(self.resolve_resume(run.resume))

    def _build_model(self) -> None:
        from pipelines.config import load_config
        from pipelines.loading.weights import load_components, read_state
        from pipelines.pose.condition import PoseEncoders, pose_width

        from .adapters import add_lora

        cfg, run = self.cfg, self.run
        self.model_config = load_config(cfg.model_config)
        torch.manual_seed(cfg.seed)
        self.components = load_components(self.model_config, run.weights, "cpu")
        generator = self.components.generator
        generator.gradient_checkpointing = bool(cfg.gradient_checkpointing)
        generator.checkpointed_blocks = cfg.checkpointed_blocks
        if run.full:
            generator.float().requires_grad_(True)
            self.trainable = list(generator.parameters())
        else:
            if self.device.type == "cuda":
                generator.to(torch.bfloat16)  # frozen base in bf16; the LoRA weights stay float32
            lora = cfg.lora
            self.trainable = add_lora(generator, lora.rank, lora.alpha, lora.dropout, lora.targets)
        encoders = None
        if run.pose:
            init = cfg.pose.init
            state = read_state(Path(init)) if init else None
            encoders = PoseEncoders(generator.config.dim, source_dim=pose_width(state) if state else None)
            if state is not None:
                missing, _ = encoders.load_state_dict(state, strict=False)
                log.info("pose encoders from %s (new: %s)", init, ", ".join(missing) or "none")
            encoders.float().requires_grad_(True)
            self.trainable += list(encoders.parameters())
        text_len = generator.config.text_len
        self.step_module = FlowStep(generator, self.model_config.frames_per_block, text_len, encoders).to(self.device)

    # -- one optimisation step

    def loss(self, step: int, micro: int) -> torch.Tensor:
        """Loss of one micro-batch. With --pose, or with probability image_to_video, the first latent
        frame is a clean prefix (as the image / pose reference is at inference)."""
        cfg, acc = self.cfg, self.accelerator
        indices = sample_indices(step, micro, acc.process_index, acc.num_processes, cfg.batch_size,
                                 cfg.gradient_accumulation, len(self.data), cfg.seed)
        items = [self.data[i] for i in indices]
        seed = ((cfg.seed * 1_000_003 + step) * 97 + micro) * 131 + acc.process_index
        torch.manual_seed(seed)  # dropout
        rng = torch.Generator().manual_seed(seed)
        with_image = cfg.image_to_video > 0 and torch.rand(1, generator=rng).item() < cfg.image_to_video
        prefix = 1 if with_image or (self.run.pose and not cfg.image_to_video) else 0
        frames_per_block = self.model_config.frames_per_block
        total = 0.0
        for group in same_size_groups(items):
            batch = collate(group, self.step_module_unwrapped.text_len)
            if cfg.prompt_dropout > 0:
                dropped = torch.rand(len(group), generator=rng) < cfg.prompt_dropout
                batch["prompts"][dropped] = self.empty_prompt
            if cfg.loss == "ode_regression":
                from .distill import ode_regression_loss

                loss = ode_regression_loss(self.step_module, batch, self.sampler_sigmas, frames_per_block,
                                           int(group[0]["prefix_frames"]), rng, self.device)
            else:
                loss = flow_matching_loss(self.step_module, batch, self.objective, frames_per_block, prefix, rng,
                                          self.device)
            total = total + loss * (len(group) / len(items))
        return total

    @property
    def step_module_unwrapped(self) -> FlowStep:
        return self.accelerator.unwrap_model(self.step_module)

    def train(self) -> list[float]:
        from tqdm import tqdm

        cfg, acc = self.cfg, self.accelerator
        acc.init_trackers("train", config={k: v for k, v in dataclasses.asdict(cfg).items()
                                           if not isinstance(v, (dict, list))})
        losses: list[float] = []
        max_steps = cfg.max_steps
        bar = tqdm(range(self.start_step, max_steps), initial=self.start_step, total=max_steps,
                   disable=not acc.is_main_process, unit="step")
        started = time.perf_counter()
        deadline = started + self.run.max_minutes * 60 if self.run.max_minutes is not None else None
        self.step_module.train()
        for step in bar:
            step_loss = 0.0
            for micro in range(cfg.gradient_accumulation):
                with acc.accumulate(self.step_module):
                    loss = self.loss(step, micro)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                step_loss += acc.reduce(loss.detach(), reduction="mean").item() / cfg.gradient_accumulation
            losses.append(step_loss)
            done = step + 1
            rate = (done - self.start_step) / (time.perf_counter() - started)
            lr = self.scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", steps_s=f"{rate:.2f}")
            if done % cfg.log_every == 0 or done == max_steps:
                acc.log({"loss": step_loss, "lr": lr, "steps_per_s": rate}, step=done)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < max_steps:
                self.save_checkpoint(done)
            if cfg.validate_every and done % cfg.validate_every == 0:
                self.write_validation_videos(done)
            if deadline is not None and done < max_steps and self._past(deadline):
                self.save_checkpoint(done)
                log.info("--max-minutes reached at step %d: checkpoint saved, continue with --resume latest", done)
                acc.end_training()
                return losses
        self.save_final()
        acc.end_training()
        return losses

    def _past(self, deadline: float) -> bool:
        """Whether any process is past the deadline (all processes then stop at the same step)."""
        late = torch.tensor(float(time.perf_counter() > deadline), device=self.device)
        return self.accelerator.reduce(late, reduction="sum").item() > 0

    # -- checkpoints

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().cpu().contiguous() for n, p in self.step_module_unwrapped.named_parameters()
                if p.requires_grad}

    def save_checkpoint(self, step: int) -> Path:
        from safetensors.torch import save_file

        acc = self.accelerator
        folder = self.run.out / "checkpoints" / f"step-{step:06d}"
        acc.wait_for_everyone()
        if acc.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            save_file(self.trainable_state(), str(folder / "trainable.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       folder / "optimizer.pt")
            (folder / "state.json").write_text(json.dumps({"step": step}))
            log.info("checkpoint %s", folder)
        acc.wait_for_everyone()
        return folder

    def resolve_resume(self, value: str | Path) -> Path:
        if value != "latest":
            return Path(value)
        found = sorted((self.run.out / "checkpoints").glob("step-*"))
        if not found:
            raise TrainingError(f"--resume latest: no checkpoint under {self.run.out / 'checkpoints'}")
        return found[-1]

    def load_checkpoint(self, folder: Path) -> int:
        from safetensors.torch import load_file

        state = load_file(str(folder / "trainable.safetensors"))
        module = self.step_module_unwrapped
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name].dtype))
        saved = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        step = json.loads((folder / "state.json").read_text())["step"]
        log.info("resumed from %s at step %d", folder, step)
        return step

    def save_final(self) -> None:
        from .adapters import save_lora, save_module

        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        module, out, cfg = self.step_module_unwrapped, self.run.out, self.cfg
        if self.run.full:
            path = save_module(module.generator, out / "generator.safetensors")
        else:
            path = save_lora(module.generator, out / "lora.safetensors", cfg.lora.rank, cfg.lora.alpha,
                             self.model_config.name, self.provenance())
        log.info("wrote %s", path)
        if module.pose_encoders is not None:
            log.info("wrote %s", save_module(module.pose_encoders, out / "checkpoints" / "pose_encoders.safetensors"))

    # -- validation videos through the streaming pipeline

    def provenance(self) -> dict[str, str]:
        """What the adapter was trained for, kept in its file's metadata (the inspector and the app show it)."""
        from .data import read_manifest

        return {"base_config": Path(self.model_config.source).name, "steps": str(self.cfg.max_steps),
                "loss": self.cfg.loss, "clips": str(len(self.data)),
                "captions": str(len({record.caption for record in read_manifest(self.run.data)}))}

    @torch.no_grad()
    def write_validation_videos(self, step: int) -> None:
        from pipelines.core import GenerationRequest, StreamingVideoPipeline
        from pipelines.loading.video_io import write_video
        from pipelines.loading.weights import Components

        acc = self.accelerator
        if not acc.is_main_process:
            return
        module = self.step_module_unwrapped
        module.eval()
        vae, encoder = self.components.vae, self.components.prompt_encoder
        vae.model.to(self.device)
        encoder.model.to(self.device)
        generator = module.generator
        pipeline = StreamingVideoPipeline(Components(generator, vae, encoder, "validation"), self.model_config,
                                          self.device)
        folder = self.run.out / "validation" / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        val = self.cfg.validation
        for index, prompt in enumerate(val.prompts):
            request = GenerationRequest(prompt, seed=val.seed, num_blocks=val.blocks)
            write_video(folder / f"prompt-{index}.mp4", (result.frames for result in pipeline.generate(request)),
                        self.model_config.fps)
        vae.model.to("cpu")
        encoder.model.to("cpu")
        module.train()
        log.info("validation videos in %s", folder)


def main(argv: list[str] | None = None) -> int:
    from pipelines.loading.weights import WeightsError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        cfg = load_training_config(args.config, max_steps=args.max_steps)
        args.out.mkdir(parents=True, exist_ok=True)
        Trainer(TrainRun.from_args(args), cfg).train()
    except (TrainingError, TrainingConfigError, WeightsError) as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
