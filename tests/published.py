"""The published few-step rule's timestep arithmetic (Self-Forcing and the projects built on it), written from their
inference code for the tests' independent references."""
from __future__ import annotations

from typing import Callable

import torch


def published_steps(steps: list[int], shift: float = 5.0) -> list[float]:
    """The projects' warp_denoising_step: timesteps = 1000 * shift*s / (1 + (shift-1)*s) over s = linspace(1, 0, 1001)
    without its last entry, a 0 appended, indexed by 1000 - step."""
    sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
    table = torch.cat([1000 * shift * sigmas / (1 + (shift - 1) * sigmas), torch.zeros(1)])
    return [float(table[1000 - step]) for step in steps]


def sigma_at(timestep: float, shift: float = 5.0) -> float:
    """The scheduler's sigma of the training table entry nearest to `timestep` (float64)."""
    sigmas = torch.linspace(1.0, 0.0, 1001)[:-1].double()
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return float(sigmas[torch.argmin((sigmas * 1000 - timestep).abs())])


def published_block(flow_at: Callable[[torch.Tensor, float], torch.Tensor], noisy: torch.Tensor, steps: list[float],
                    rng: torch.Generator) -> torch.Tensor:
    """One block through the listed steps: x0 = x_t - sigma * flow (float64), re-noised to the next step with fresh
    noise drawn in [F, C, H, W] order; the last step's x0 is the block's clean latents."""
    for index, t in enumerate(steps):
        clean = (noisy.double() - sigma_at(t) * flow_at(noisy, t).double()).float()
        if index + 1 < len(steps):
            frames, (channels, height, width) = noisy.shape[2], (noisy.shape[1], *noisy.shape[3:])
            fresh = torch.randn((frames, channels, height, width), generator=rng)[None].permute(0, 2, 1, 3, 4)
            sigma = sigma_at(steps[index + 1])
            noisy = (1 - sigma) * clean + sigma * fresh
    return clean
