"""Rectified-flow matching as Wan trains it, with an independent noise level per block.

x_t = (1 - sigma) * x0 + sigma * noise, the generator predicts the velocity noise - x0, and
sigma is drawn uniformly (or logit-normally) and warped by the shift (5.0), the same warp the
few-step sampler's timesteps come from. Every block of frames gets its own sigma (diffusion
forcing), which is what block-by-block inference over a clean cache needs; with teacher
forcing, a random number of leading blocks stays clean (sigma 0) and out of the loss.

A model trained from scratch for the few-step sampler also sees that sampler's own noise levels
(few_step_fraction of the blocks draw one of few_step_sigmas): those are the only inputs the
sampler ever gives it.

foreground_weight > 0 weighs the latent positions that stand out from their frame (squared
distance to the frame's per-channel median, averaged over channels, above FOREGROUND_ENERGY)
1 + foreground_weight times: in the synthetic world a shape is a few latent positions on a plain
background, and an unweighted loss, mostly background, trained a teacher whose samples had no shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000
FOREGROUND_ENERGY = 1.0  # unit-scale latents: a shape's positions are mostly above, a plain background's below


@dataclass(frozen=True)
class FlowObjective:
    shift: float = 5.0
    sampling: str = "uniform"  # or "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    teacher_forcing: float = 0.0  # probability that a sample keeps some leading blocks clean
    few_step_fraction: float = 0.0  # share of blocks noised to one of few_step_sigmas instead
    few_step_sigmas: tuple[float, ...] = ()  # the few-step sampler's sigmas (set by the trainer)
    foreground_weight: float = 0.0  # extra weight of the latent positions that stand out from their frame

    def __post_init__(self) -> None:
        if self.sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"sampling must be 'uniform' or 'logit_normal', got {self.sampling!r}")
        if self.few_step_fraction and not self.few_step_sigmas:
            raise ValueError("few_step_fraction needs the sampler's few_step_sigmas")

    def shifted(self, u: torch.Tensor) -> torch.Tensor:
        return self.shift * u / (1 + (self.shift - 1) * u)

    def block_sigmas(self, batch: int, blocks: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma [B, blocks], in_loss [B, blocks] bool)."""
        if self.sampling == "uniform":
            u = torch.rand(batch, blocks, generator=rng)
        else:
            u = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(batch, blocks, generator=rng))
        sigma = self.shifted(u)
        if self.few_step_fraction > 0:
            table = torch.tensor(self.few_step_sigmas, dtype=sigma.dtype)
            pick = table[torch.randint(len(table), sigma.shape, generator=rng)]
            sigma = torch.where(torch.rand(sigma.shape, generator=rng) < self.few_step_fraction, pick, sigma)
        in_loss = torch.ones(batch, blocks, dtype=torch.bool)
        if self.teacher_forcing > 0 and blocks > 1:
            clean_count = torch.randint(1, blocks, (batch,), generator=rng)
            use = torch.rand(batch, generator=rng) < self.teacher_forcing
            clean = (torch.arange(blocks)[None, :] < clean_count[:, None]) & use[:, None]
            sigma = sigma.masked_fill(clean, 0.0)
            in_loss &= ~clean
        return sigma, in_loss


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma_frames: torch.Tensor) -> torch.Tensor:
    """x_t for latents [B, C, F, H, W] at per-frame sigma [B, F]."""
    sigma = sigma_frames[:, None, :, None, None].to(x0.dtype)
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the generator predicts: d x_t / d sigma = noise - x0."""
    return noise - x0


def position_weights(x0: torch.Tensor, foreground_weight: float) -> torch.Tensor:
    """[B, F, H, W] for latents [B, C, F, H, W]: 1, or 1 + foreground_weight where a position stands out."""
    median = x0.float().flatten(3).median(dim=3).values[..., None, None]
    energy = (x0.float() - median).pow(2).mean(dim=1)
    return 1.0 + foreground_weight * (energy > FOREGROUND_ENERGY).float()


def flow_loss(prediction: torch.Tensor, target: torch.Tensor, frame_weights: torch.Tensor,
              positions: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean squared error over the frames in the loss (frame_weights [B, F], 1 = counted),
    each latent position counted positions [B, F, H, W] times (default: once)."""
    per_position = (prediction.float() - target.float()).pow(2).mean(dim=1)
    weights = frame_weights.to(per_position)[:, :, None, None].expand_as(per_position)
    if positions is not None:
        weights = weights * positions.to(per_position)
    return (per_position * weights).sum() / weights.sum().clamp_min(1.0)


def few_step_sigmas(sampler) -> tuple[float, ...]:
    """The noise levels a model config's few-step sampler feeds the generator (none for other samplers)."""
    from pipelines.scheduler import FewStepSchedule

    if sampler.kind != "few_step":
        return ()
    schedule = FewStepSchedule(sampler.denoising_steps, sampler.timestep_shift, sampler.warp_denoising_step)
    return tuple(float(t) / NUM_TRAIN_TIMESTEPS for t in schedule.steps)
