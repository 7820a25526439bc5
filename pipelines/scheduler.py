"""Samplers for one block of latent frames: Self-Forcing's few-step list and multi-step CFG solvers; and Rolling
Forcing's window of blocks at staggered noise levels.

The pipeline core owns the block loop and the KV caches; a BlockSampler owns the maths of
denoising one block, calling back into the generator through a FlowPredictor.

Few-step: sigmas = linspace(1, 0, 1001)[:-1] warped by shift s (s*sigma / (1 + (s-1)*sigma)),
timesteps = 1000*sigma; the configured steps [1000, 750, 500, 250] index into that table
(timesteps[1000 - step], with 0 appended), giving [1000, 937.5, 833.3, 625] for s = 5. A model may
denoise its first block with a longer list of the same table (Causal Forcing++: 1 or 2 steps per
block, 4 for the first one, whose frame has no past to lean on).
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from .config import SamplerConfig

NUM_TRAIN_TIMESTEPS = 1000


class FlowPredictor(Protocol):
    """The generator on the current block: velocity for `latents` at `timestep` under context
    `context_index` (0 = the prompt, 1 = the negative prompt)."""

    def __call__(self, latents: torch.Tensor, timestep: float, context_index: int) -> torch.Tensor: ...


def reference_noise(shape: tuple[int, ...], rng: torch.Generator, device: torch.device | str,
                    dtype: torch.dtype) -> torch.Tensor:
    """Gaussian noise of shape [B, C, F, H, W] drawn in the reference's [B, F, C, H, W] order,
    so that a seed gives the same numbers as the reference implementation."""
    batch, channels, frames, height, width = shape
    return torch.randn((batch, frames, channels, height, width), generator=rng, device=device,
                       dtype=dtype).permute(0, 2, 1, 3, 4)


class FewStepSchedule:
    """The training-time flow-matching table the distilled generator was trained on."""

    def __init__(self, denoising_steps: list[int], shift: float, warp: bool = True) -> None:
        sigmas = torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1]
        self.sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = self.sigmas * NUM_TRAIN_TIMESTEPS
        steps = torch.tensor(denoising_steps, dtype=torch.long)
        if warp:
            table = torch.cat([self.timesteps, torch.zeros(1)])
            self.steps = table[NUM_TRAIN_TIMESTEPS - steps]
        else:
            self.steps = steps.float()

    def sigma(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """Sigma at the table entry nearest to timestep (as the reference looks it up)."""
        t = torch.as_tensor(timestep, dtype=self.timesteps.dtype).reshape(-1)
        index = torch.argmin((self.timesteps[None, :] - t[:, None]).abs(), dim=1)
        return self.sigmas[index].to(torch.float64)

    def to_x0(self, flow: torch.Tensor, noisy: torch.Tensor, timestep: float) -> torch.Tensor:
        """x0 = x_t - sigma_t * flow, in float64 like the reference."""
        sigma = self.sigma(timestep).item()
        return (noisy.double() - sigma * flow.double()).to(flow.dtype)

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, timestep: float) -> torch.Tensor:
        """(1 - sigma) * x0 + sigma * noise, computed in float32 like the reference."""
        sigma = self.sigma(timestep).to(torch.float32).item()
        return ((1 - sigma) * clean.float() + sigma * noise.float()).type_as(noise)


def make_multistep_solver(solver: str, steps: int, shift: float, device: torch.device | str):
    """A fresh diffusers flow-matching solver for one block of the non-distilled sampler."""
    if solver == "unipc":
        scheduler = UniPCMultistepScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=shift)
    elif solver == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    else:
        raise ValueError(f"unknown solver {solver!r}; choose 'unipc' or 'euler'")
    scheduler.set_timesteps(steps, device=device)
    return scheduler


class BlockSampler(Protocol):
    num_contexts: int  # prompt embeddings (and KV caches) the sampler needs: 2 with CFG

    def denoise(self, noisy: torch.Tensor, predict: FlowPredictor, rng: torch.Generator,
                first_block: bool = False, source: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
        """Pure noise of one block [B, C, F, H, W] -> its clean latents (`first_block`: the run's first generated
        block). With `source` (video-to-video): the source latents noised to `strength` take the noise's place."""
        ...


class FewStepSampler:
    """Self-Forcing's distilled sampler: predict x0, re-noise to the next listed timestep."""

    num_contexts = 1

    def __init__(self, config: SamplerConfig) -> None:
        self.schedule = FewStepSchedule(config.denoising_steps, config.timestep_shift, config.warp_denoising_step)
        self.first_block_schedule = self.schedule if not config.first_block_steps else FewStepSchedule(
            config.first_block_steps, config.timestep_shift, config.warp_denoising_step)

    def denoise(self, noisy: torch.Tensor, predict: FlowPredictor, rng: torch.Generator,
                first_block: bool = False, source: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
        schedule = self.first_block_schedule if first_block else self.schedule
        steps = schedule.steps.tolist()
        if source is not None:  # SDEdit: start at the listed step whose noise level is nearest the strength
            first = min(range(len(steps)), key=lambda i: abs(float(schedule.sigma(steps[i])) - strength))
            steps = steps[first:]
            noisy = schedule.add_noise(source.to(noisy.dtype), noisy, steps[0])
        for i, t in enumerate(steps):
            clean = self.schedule.to_x0(predict(noisy, t, 0), noisy, t)
            if i + 1 < len(steps):
                fresh = reference_noise(clean.shape, rng, clean.device, clean.dtype)
                noisy = self.schedule.add_noise(clean, fresh, steps[i + 1])
        return clean


class MultiStepCFGSampler:
    """Non-distilled causal checkpoints: a diffusers flow solver with classifier-free guidance."""

    num_contexts = 2

    def __init__(self, config: SamplerConfig) -> None:
        self.config = config

    def denoise(self, noisy: torch.Tensor, predict: FlowPredictor, rng: torch.Generator,
                first_block: bool = False, source: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
        if source is not None:
            raise ValueError("video-to-video needs a few-step model")
        cfg = self.config
        solver = make_multistep_solver(cfg.solver, cfg.num_steps, cfg.timestep_shift, noisy.device)
        latents = noisy
        for t in solver.timesteps:
            cond, uncond = predict(latents, float(t), 0), predict(latents, float(t), 1)
            flow = uncond + cfg.guidance_scale * (cond - uncond)
            latents = solver.step(flow, t, latents, return_dict=False)[0]
        return latents


class WindowPredictor(Protocol):
    """The generator on a window of blocks: velocity for `latents` [B, C, F, H, W] whose frames are at `timesteps`
    [1, F], the window starting at video frame `start_frame`."""

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, start_frame: int) -> torch.Tensor: ...


class RollingWindowSampler:
    """Rolling Forcing (TencentARC/RollingForcing, pipeline/rolling_forcing_inference.py): a window of as many blocks
    as there are listed steps is denoised in one pass, each block one step further than the block after it, so
    one block leaves clean per pass. Block b takes its step i in pass b + i: its first pass starts it from its
    noise, each pass predicts x0 and re-noises it to its next step, its last pass gives its clean latents."""

    num_contexts = 1

    def __init__(self, config: SamplerConfig) -> None:
        self.schedule = FewStepSchedule(config.denoising_steps, config.timestep_shift, config.warp_denoising_step)

    def start(self, num_blocks: int, frames_per_block: int) -> "RollingWindow":
        """One run's blocks in flight (per run: the sampler itself is shared)."""
        return RollingWindow(self.schedule, num_blocks, frames_per_block)


class RollingWindow:
    """The blocks of one run that have started and not finished, each at its current step's input."""

    def __init__(self, schedule: FewStepSchedule, num_blocks: int, frames_per_block: int) -> None:
        self.schedule, self.num_blocks, self.frames_per_block = schedule, num_blocks, frames_per_block
        self.steps = schedule.steps.tolist()
        self.inputs: dict[int, torch.Tensor] = {}
        self.finished: dict[int, torch.Tensor] = {}
        self.next_pass = 0

    def finish(self, block: int, noise: Callable[[int], torch.Tensor], predict: WindowPredictor,
               rng: torch.Generator) -> torch.Tensor:
        """Runs window passes until `block` is clean and returns it. noise(b): block b's starting noise."""
        while block not in self.finished:
            self._window_pass(noise, predict, rng)
        return self.finished.pop(block)

    def _window_pass(self, noise: Callable[[int], torch.Tensor], predict: WindowPredictor,
                     rng: torch.Generator) -> None:
        index, last_step = self.next_pass, len(self.steps) - 1
        if index < self.num_blocks:
            self.inputs[index] = noise(index)
        blocks = list(range(max(0, index - last_step), min(self.num_blocks - 1, index) + 1))
        fpb = self.frames_per_block
        latents = torch.cat([self.inputs[b] for b in blocks], dim=2)
        timesteps = torch.tensor([[self.steps[index - b] for b in blocks for _ in range(fpb)]],
                                 dtype=torch.float32, device=latents.device)
        flow = predict(latents, timesteps, blocks[0] * fpb)
        for slot, b in enumerate(blocks):  # the oldest block first
            step, noisy = index - b, self.inputs[b]
            clean = self.schedule.to_x0(flow[:, :, slot * fpb:(slot + 1) * fpb], noisy, self.steps[step])
            if step == last_step:
                self.finished[b] = clean
                del self.inputs[b]
            else:
                fresh = reference_noise(clean.shape, rng, clean.device, clean.dtype)
                self.inputs[b] = self.schedule.add_noise(clean, fresh, self.steps[step + 1])
        self.next_pass += 1


def make_sampler(config: SamplerConfig) -> BlockSampler | RollingWindowSampler:
    if config.kind == "few_step":
        return FewStepSampler(config)
    if config.kind == "multi_step":
        return MultiStepCFGSampler(config)
    if config.kind == "rolling":
        return RollingWindowSampler(config)
    raise ValueError(f"unknown sampler kind {config.kind!r}; choose 'few_step', 'multi_step' or 'rolling'")
