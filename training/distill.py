"""Distilling a multi-step teacher into the few-step generator by ODE regression (as CausVid
initialises its student).

A generator trained by flow matching predicts the *mean* clean video given a noisy one. The few-step
sampler feeds it pure noise, takes that prediction and re-noises it with fresh noise: a mean has no
shape in it, so the next step sees no shape either and the video stays a blur of its background.
A teacher sampled with many small Euler steps follows its probability-flow ODE instead, which maps
each noise to one sharp video. Recording the teacher's path at the few-step sampler's noise levels
gives pairs (x_sigma, x_0 at the end of that path); regressing the student onto them makes every
step of the few-step sampler land on a real sample. The points of an ODE path have the same
distribution as fresh-noise re-noising of its end point, so the few-step sampler's inputs are what
the student was trained on.

The teacher runs block by block with a clean context, exactly as inference does (a block-causal
pass over the clean earlier blocks plus the noisy block), with classifier-free guidance against an
empty prompt.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .data import ClipRecord

log = logging.getLogger(__name__)


def euler_grid(steps: int, record_sigmas: tuple[float, ...]) -> torch.Tensor:
    """sigmas 1 -> 0 in `steps` equal Euler steps, plus each recorded sigma that is not on that grid (a
    warped few-step schedule such as Self-Forcing's 1, .94, .83, .63 is not): the path passes every one."""
    grid = torch.arange(steps, -1, -1, dtype=torch.float64) / steps
    extra = [sigma for sigma in record_sigmas
             if not torch.isclose(grid, torch.tensor(sigma, dtype=torch.float64)).any()]
    if extra:
        grid = torch.cat([grid, torch.tensor(extra, dtype=torch.float64)]).unique().flip(0)
    return grid


@torch.no_grad()
def teacher_trajectories(teacher: nn.Module, latents: torch.Tensor, prompts: torch.Tensor, prefix_frames: int,
                         record_sigmas: tuple[float, ...], steps: int, guidance: float, generator: torch.Generator,
                         poses: list | None = None, reference_poses: list | None = None,
                         unconditional: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples videos shaped like `latents` [B, C, F, h, w] from `teacher` (a training.train.FlowStep),
    the first `prefix_frames` frames taken from `latents` (image / pose reference). `unconditional`
    [text_len, d]: the prompt guidance pushes away from (default: zeros).

    Returns (clean [B, C, F', h, w], trajectory [B, S, C, F', h, w]): the teacher's videos and, for each
    recorded sigma, the noisy latents the ODE passed through (prefix frames clean). F' = prefix + whole blocks.
    """
    frames_per_block = teacher.frames_per_block
    grid = euler_grid(steps, record_sigmas)
    device = next(teacher.parameters()).device
    batch, channels, frames, height, width = latents.shape
    blocks = (frames - prefix_frames) // frames_per_block
    clean = latents[:, :, :prefix_frames].to(device)
    trajectory = torch.zeros(batch, len(record_sigmas), channels, prefix_frames + blocks * frames_per_block,
                             height, width)
    trajectory[:, :, :, :prefix_frames] = latents[:, None, :, :prefix_frames]
    prompts = prompts.to(device)
    empty = torch.zeros_like(prompts) if unconditional is None else unconditional.to(prompts).expand_as(prompts)
    condition = teacher.pose_condition(latents.to(device), prefix_frames, poses, reference_poses)
    context = teacher.sampling_context(prompts, empty, guidance, prefix_frames, condition,
                                       prefix_frames + blocks * frames_per_block)
    for block in range(blocks):
        start = prefix_frames + block * frames_per_block
        context.follow(clean)
        x = torch.randn(batch, channels, frames_per_block, height, width, generator=generator).to(device)
        for sigma, sigma_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
            for slot, recorded in enumerate(record_sigmas):
                if abs(sigma - recorded) < 1e-9:
                    trajectory[:, slot, :, start:start + frames_per_block] = x.float().cpu()
            x = x + (sigma_next - sigma) * context.flow(x, sigma)
        clean = torch.cat([clean, x], dim=2)
    return clean.float().cpu(), trajectory


class TeacherContext:
    """A teacher's block-by-block sampling context (what FlowStep.sampling_context returns): the clean frames so far
    in KV caches, one per prompt set (the prompts and, with guidance, the empty prompt), so each Euler step runs the
    noisy block alone against them. A full pass over the clip at every step would compute every earlier block
    again (tests/test_distill.py checks both give the same paths)."""

    def __init__(self, generator: nn.Module, frames_per_block: int, prompts: torch.Tensor, empty: torch.Tensor,
                 guidance: float, prefix_frames: int, condition: tuple[torch.Tensor, torch.Tensor] | None,
                 total_frames: int) -> None:
        self.generator, self.frames_per_block, self.guidance = generator, frames_per_block, guidance
        self.prefix_frames, self.condition, self.total_frames = prefix_frames, condition, total_frames
        self.contexts = [generator.encode_context(prompts)]
        if guidance != 1.0:
            self.contexts.append(generator.encode_context(empty))
        self.caches: list = []
        self.written = 0  # frames in the caches

    def follow(self, clean: torch.Tensor) -> None:
        """Writes the frames of `clean` [B, C, F, h, w] not yet in the caches (the prefix, then whole blocks), at
        timestep 0 as inference writes its finished blocks."""
        if not self.caches:
            self._make_caches(clean)
        while self.written < clean.shape[2]:
            frames = self.prefix_frames if self.written == 0 and self.prefix_frames else self.frames_per_block
            block = clean[:, :, self.written:self.written + frames]
            if self.written == 0 and self.prefix_frames and self.condition is not None:
                block = block + self.condition[0]  # the reference frame carries the reference pose's features
            timesteps = torch.zeros(block.shape[0], frames, device=block.device)
            for context, cache in zip(self.contexts, self.caches):
                self.generator(block, timesteps, context, start_frame=self.written, kv_cache=cache,
                               token_bias=self._bias(self.written, frames))
            self.written += frames

    def flow(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The classifier-free-guided velocity of the noisy block `x` at `sigma` after the frames written."""
        timesteps = torch.full((x.shape[0], x.shape[2]), sigma * 1000, device=x.device)
        bias = self._bias(self.written, x.shape[2])
        flows = [self.generator(x, timesteps, context, start_frame=self.written, kv_cache=cache, token_bias=bias)
                 for context, cache in zip(self.contexts, self.caches)]
        return flows[0] if len(flows) == 1 else flows[1] + self.guidance * (flows[0] - flows[1])

    def _bias(self, start_frame: int, frames: int) -> torch.Tensor | None:
        """The pose tokens of generated frames [start, start + frames) (none for the reference frame)."""
        if self.condition is None or start_frame < self.prefix_frames:
            return None
        tokens, frame_tokens = self.condition[1], self.caches[0].frame_tokens
        first = (start_frame - self.prefix_frames) * frame_tokens
        return tokens[:, first:first + frames * frame_tokens]

    def _make_caches(self, like: torch.Tensor) -> None:
        from pipelines.model.kv_cache import AttentionWindow

        model, (batch, _, _, height, width) = self.generator, like.shape
        self.caches = [model.new_kv_cache(self.total_frames, model.frame_tokens(height, width), AttentionWindow(),
                                          like.device, batch=batch) for _ in self.contexts]


@torch.no_grad()
def student_trajectories(student: nn.Module, latents: torch.Tensor, prompts: torch.Tensor, prefix_frames: int,
                         sigmas: tuple[float, ...], generator: torch.Generator, answer=None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples videos shaped like `latents` with the few-step sampler's own rule (at each sigma predict x0, then
    re-noise it with fresh noise to the next sigma; the last x0 is the block), block by block over the clean
    earlier blocks. Returns (clean [B, C, F', h, w], inputs [B, S, C, F', h, w], targets [B, S, C, F', h, w]):
    what the generator saw at each sigma and what it predicted there. Regressing onto these pairs asks a LoRA
    to leave the generator's behaviour as it was: the loss is zero before training.

    answer(clean, x, sigma) -> video: another model's target at each input instead of the student's own
    prediction (on_policy_paths); the block's clean frames are then its answer at the second sigma."""
    frames_per_block = student.frames_per_block
    device = next(student.parameters()).device
    batch, channels, frames, height, width = latents.shape
    blocks = (frames - prefix_frames) // frames_per_block
    total = prefix_frames + blocks * frames_per_block
    clean = latents[:, :, :prefix_frames].to(device)
    inputs = torch.zeros(batch, len(sigmas), channels, total, height, width)
    targets = torch.zeros_like(inputs)
    inputs[:, :, :, :prefix_frames] = targets[:, :, :, :prefix_frames] = latents[:, None, :, :prefix_frames]
    prompts = prompts.to(device)
    for block in range(blocks):
        start = prefix_frames + block * frames_per_block
        shape = (batch, channels, frames_per_block, height, width)
        x = torch.randn(shape, generator=generator).to(device)
        answers = []
        for level, sigma in enumerate(sigmas):
            timesteps = torch.zeros(batch, start + frames_per_block, device=device)
            timesteps[:, start:] = sigma * 1000
            flow = student(torch.cat([clean, x], dim=2), timesteps, prompts, prefix_frames)[:, :, start:]
            x0 = x - sigma * flow.float()
            answers.append(x0 if answer is None else answer(clean, x, sigma))
            inputs[:, level, :, start:start + frames_per_block] = x.float().cpu()
            targets[:, level, :, start:start + frames_per_block] = answers[-1].float().cpu()
            if level + 1 < len(sigmas):  # the sampler's next input: its x0 re-noised with fresh noise
                following = sigmas[level + 1]
                x = (1 - following) * x0 + following * torch.randn(shape, generator=generator).to(device)
        block_frames = x0 if answer is None else answers[min(1, len(answers) - 1)]
        clean = torch.cat([clean, block_frames.to(clean.dtype)], dim=2)
    return clean.float().cpu(), inputs, targets


@torch.no_grad()
def on_policy_paths(student: nn.Module, teacher: nn.Module, latents: torch.Tensor, prompts: torch.Tensor,
                    prefix_frames: int, sigmas: tuple[float, ...], steps: int, guidance: float,
                    generator: torch.Generator, unconditional: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs for the student at the inputs its own sampler reaches, with the teacher's answers there.

    The student's chain runs as at inference (student_trajectories); at each sigma the teacher's guided ODE is
    solved from the student's input down to 0, and that video is the target. From sigma < 1 on the input
    already holds where the student puts its subject, and the teacher keeps it there: a handful of videos then
    teach *what* to draw, not a new map from noise to place (teacher_trajectories' targets, from pure noise,
    put the subject wherever the teacher's ODE does, and a student regressed onto a few of those learns their
    blurred mean). The block's clean frames for the next block are the teacher's answer at the second sigma
    (the student's place, the teacher's drawing).
    Returns (clean [B, C, F', h, w], inputs [B, S, C, F', h, w], targets [B, S, C, F', h, w])."""
    grid = euler_grid(steps, sigmas).tolist()
    prompts = prompts.to(next(teacher.parameters()).device)
    empty = unconditional.to(prompts).expand_as(prompts)
    blocks = (latents.shape[2] - prefix_frames) // teacher.frames_per_block
    context = teacher.sampling_context(prompts, empty, guidance, prefix_frames, None,
                                       prefix_frames + blocks * teacher.frames_per_block)

    def teacher_answer(clean: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        context.follow(clean)
        points = [sigma] + [g for g in grid if g < sigma - 1e-9]
        for now, after in zip(points[:-1], points[1:]):
            x = x + (after - now) * context.flow(x, now)
        return x

    return student_trajectories(student, latents, prompts, prefix_frames, sigmas, generator, teacher_answer)


def ode_regression_loss(student: nn.Module, batch: dict, record_sigmas: tuple[float, ...], frames_per_block: int,
                        prefix_frames: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
    """One block of each clip at one of its recorded noise levels, after the clean earlier blocks;
    MSE between the student's clean prediction and the end of the teacher's path (or, where the batch has
    `targets`, the prediction recorded for that level: student_trajectories' preservation pairs)."""
    x0, trajectory = batch["latents"], batch["trajectory"]
    clips = x0.shape[0]
    blocks = (x0.shape[2] - prefix_frames) // frames_per_block
    block = int(torch.randint(blocks, (1,), generator=rng))
    start = prefix_frames + block * frames_per_block
    end = start + frames_per_block
    level = torch.randint(len(record_sigmas), (clips,), generator=rng)
    sigma = torch.tensor(record_sigmas, dtype=torch.float32)[level]
    noisy = x0[:, :, :end].clone()
    noisy[:, :, start:end] = trajectory[torch.arange(clips), level, :, start:end]
    timesteps = torch.zeros(clips, end)
    timesteps[:, start:] = sigma[:, None] * 1000
    noisy, sigma = noisy.to(device), sigma.to(device)
    flow = student(noisy, timesteps.to(device), batch["prompts"].to(device), prefix_frames, batch.get("poses"),
                   batch.get("reference_poses"))[:, :, start:]
    predicted = noisy[:, :, start:].float() - sigma[:, None, None, None, None] * flow.float()
    if "targets" in batch:
        target = batch["targets"][torch.arange(clips), level, :, start:end]
    else:
        target = x0[:, :, start:end]
    return (predicted - target.to(device).float()).pow(2).mean()


def prefix_for(index: int, has_pose: bool, image_to_video: float, seed: int) -> int:
    """Clean leading latent frames of a clip's teacher video: 1 for pose clips (their reference) and
    for an `image_to_video` share of the others (image-to-video), else 0 (text-to-video)."""
    if has_pose:
        return 1
    return int(random.Random(seed * 1_000_003 + index).random() < image_to_video)


@dataclasses.dataclass
class PathJob:
    """One teacher video to sample and record: its manifest line, its inputs (`latents` gives the shape and the
    first `prefix` clean frames; `prompt`; optional `pose` / `reference_pose`) and how many clean leading frames."""
    record: "ClipRecord"
    item: dict
    prefix: int


@torch.no_grad()
def record_paths(sample, jobs: list[PathJob], target: Path, text_len: int, seed: int, batch_size: int = 128) -> int:
    """Samples every job's video with `sample(batch, prefix, generator)` -> (videos, trajectory[, targets]) (the
    teacher's ODE, teacher_trajectories, or the student's own sampler, student_trajectories) and writes them as a
    folder the trainer reads (latents = the video, trajectory, targets, prefix_frames, prompt, poses). Jobs of one
    latent size and prefix are batched. Returns the video count."""
    from .data import ShardWriter, collate

    groups: dict[tuple, list[PathJob]] = {}
    for job in jobs:
        groups.setdefault((tuple(job.item["latents"].shape), job.prefix), []).append(job)
    writer = ShardWriter(target, clips_per_shard=256)
    generator = torch.Generator().manual_seed(seed)
    started, done = time.perf_counter(), 0
    for (_, prefix), group in sorted(groups.items(), key=lambda entry: entry[0]):
        for first in range(0, len(group), batch_size):
            chunk = group[first:first + batch_size]
            batch = collate([job.item for job in chunk], text_len)
            videos, paths, *targets = sample(batch, prefix, generator)
            for row, job in enumerate(chunk):
                tensors = {"latents": videos[row], "trajectory": paths[row].to(torch.bfloat16),
                           "prefix_frames": torch.tensor(prefix), "prompt": job.item["prompt"]}
                if targets:
                    tensors["targets"] = targets[0][row].to(torch.bfloat16)
                tensors.update({k: job.item[k] for k in ("pose", "reference_pose") if k in job.item})
                writer.add(dataclasses.replace(job.record), tensors)
            done += len(chunk)
            log.info("videos with paths: %d/%d (%.2f videos/s)", done, len(jobs), done / (time.perf_counter() - started))
    writer.flush()
    return done


def distill_dataset(teacher: nn.Module, source: Path, target: Path, record_sigmas: tuple[float, ...], steps: int,
                    guidance: float, image_to_video: float, unconditional: torch.Tensor, seed: int,
                    batch_size: int = 128) -> int:
    """The teacher's video of every clip of the prepared folder `source`, from the clip's prompt (and first
    latent / poses, see prefix_for), recorded as record_paths does. Returns the clip count."""
    from .data import CachedClips, read_manifest

    records = read_manifest(source)
    clips = CachedClips(source, in_memory=True)
    jobs = []
    for index in range(len(clips)):
        item = clips[index]
        jobs.append(PathJob(records[index], item, prefix_for(index, "pose" in item, image_to_video, seed)))
    teacher.eval()

    def sample(batch: dict, prefix: int, generator: torch.Generator):
        return teacher_trajectories(teacher, batch["latents"], batch["prompts"], prefix, record_sigmas, steps, guidance,
                                    generator, batch.get("poses"), batch.get("reference_poses"), unconditional)

    return record_paths(sample, jobs, target, len(unconditional), seed, batch_size)
