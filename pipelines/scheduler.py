"""Flow-matching timestep schedules: Self-Forcing's few-step list and multi-step solvers.

Few-step: sigmas = linspace(1, 0, 1001)[:-1] warped by shift s (s*sigma / (1 + (s-1)*sigma)),
timesteps = 1000*sigma; the configured steps [1000, 750, 500, 250] index into that table
(timesteps[1000 - step], with 0 appended), giving [1000, 937.5, 833.3, 625] for s = 5.
"""
from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

NUM_TRAIN_TIMESTEPS = 1000


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
