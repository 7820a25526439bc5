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

import torch
from torch import nn

log = logging.getLogger(__name__)


def euler_grid(steps: int, record_sigmas: tuple[float, ...]) -> torch.Tensor:
    """sigmas 1 -> 0 in `steps` equal Euler steps; every recorded sigma must be on the grid."""
    grid = torch.arange(steps, -1, -1, dtype=torch.float64) / steps
    for sigma in record_sigmas:
        if not torch.isclose(grid, torch.tensor(sigma, dtype=torch.float64)).any():
            raise ValueError(f"sigma {sigma} is not on a {steps}-step Euler grid: pick a multiple of its denominator")
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
    for block in range(blocks):
        start = prefix_frames + block * frames_per_block
        x = torch.randn(batch, channels, frames_per_block, height, width, generator=generator).to(device)
        for sigma, sigma_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
            for slot, recorded in enumerate(record_sigmas):
                if abs(sigma - recorded) < 1e-9:
                    trajectory[:, slot, :, start:start + frames_per_block] = x.float().cpu()
            noisy = torch.cat([clean, x], dim=2)
            timesteps = torch.zeros(batch, noisy.shape[2], device=device)
            timesteps[:, start:] = sigma * 1000
            flow = teacher(noisy, timesteps, prompts, prefix_frames, pose_condition=condition)[:, :, start:]
            if guidance != 1.0:
                flow_empty = teacher(noisy, timesteps, empty, prefix_frames, pose_condition=condition)[:, :, start:]
                flow = flow_empty + guidance * (flow - flow_empty)
            x = x + (sigma_next - sigma) * flow
        clean = torch.cat([clean, x], dim=2)
    return clean.float().cpu(), trajectory


def ode_regression_loss(student: nn.Module, batch: dict, record_sigmas: tuple[float, ...], frames_per_block: int,
                        prefix_frames: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
    """One block of each clip at one of its recorded noise levels, after the clean earlier blocks;
    MSE between the student's clean prediction and the end of the teacher's path."""
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
    return (predicted - x0[:, :, start:end].to(device).float()).pow(2).mean()


def prefix_for(index: int, has_pose: bool, image_to_video: float, seed: int) -> int:
    """Clean leading latent frames of a clip's teacher video: 1 for pose clips (their reference) and
    for an `image_to_video` share of the others (image-to-video), else 0 (text-to-video)."""
    if has_pose:
        return 1
    return int(random.Random(seed * 1_000_003 + index).random() < image_to_video)


@torch.no_grad()
def distill_dataset(teacher: nn.Module, source: Path, target: Path, record_sigmas: tuple[float, ...], steps: int,
                    guidance: float, image_to_video: float, unconditional: torch.Tensor, seed: int,
                    batch_size: int = 128) -> int:
    """Writes, for every clip of the prepared folder `source`, the teacher's video from the clip's
    prompt (and first latent / poses, see prefix_for) with its recorded path, as a folder the trainer
    reads (latents = the teacher's video, trajectory, prefix_frames, prompt, poses). Returns the clip count."""
    from .data import CachedClips, ShardWriter, read_manifest
    from .train import collate

    records = read_manifest(source)
    clips = CachedClips(source, in_memory=True)
    groups: dict[tuple, list[int]] = {}
    for index in range(len(clips)):
        item = clips[index]
        prefix = prefix_for(index, "pose" in item, image_to_video, seed)
        groups.setdefault((tuple(item["latents"].shape), prefix), []).append(index)
    writer = ShardWriter(target, clips_per_shard=256)
    generator = torch.Generator().manual_seed(seed)
    started, done = time.perf_counter(), 0
    teacher.eval()
    for (_, prefix), indices in sorted(groups.items()):
        for first in range(0, len(indices), batch_size):
            chunk = indices[first:first + batch_size]
            items = [clips[i] for i in chunk]
            batch = collate(items, len(unconditional))
            videos, paths = teacher_trajectories(teacher, batch["latents"], batch["prompts"], prefix, record_sigmas,
                                                 steps, guidance, generator, batch.get("poses"),
                                                 batch.get("reference_poses"), unconditional)
            for row, (index, item) in enumerate(zip(chunk, items)):
                tensors = {"latents": videos[row], "trajectory": paths[row].to(torch.bfloat16),
                           "prefix_frames": torch.tensor(prefix), "prompt": item["prompt"]}
                tensors.update({k: item[k] for k in ("pose", "reference_pose") if k in item})
                writer.add(dataclasses.replace(records[index]), tensors)
            done += len(chunk)
            log.info("teacher videos: %d/%d (%.1f clips/s)", done, len(clips), done / (time.perf_counter() - started))
    writer.flush()
    return done
