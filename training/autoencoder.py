"""Trains a (tiny) AutoencoderKLWan from scratch: L1 + MSE reconstruction and a small KL term.

The reconstruction terms can weigh foreground pixels (those far from their frame's median colour)
more: in the synthetic world a shape covers a few per cent of the frame, so an unweighted loss is
mostly background, and a VAE trained on it returned shapes in colours the evaluator no longer
recognised (the named colour's blob was found in the reconstructions of only 1/3 of held-out clips).

Clips are short (1 + 4k frames) so that both the causal first frame (what image-to-video encodes)
and the 4-frame temporal packing are trained; k >= 2 trains a latent that follows a full 4-frame
latent (the causal caches then hold a full latent's features), which every later latent of a clip is. After training, the latents' per-channel
mean and std are measured and stored in the VAE's config (latents_mean / latents_std), which is
how the pipeline normalises Wan latents: the generator then sees unit-scale latents.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from diffusers import AutoencoderKLWan

from .train import learning_rate_factor

log = logging.getLogger(__name__)

ClipBatch = Callable[[int], torch.Tensor]  # step -> pixels [B, 3, T, H, W] in [-1, 1]


FOREGROUND_DISTANCE = 0.1  # in [-1, 1] units, on the channel that differs most from the frame's median


def foreground_weights(pixels: torch.Tensor, foreground_weight: float) -> torch.Tensor:
    """[B, 1, T, H, W]: 1 + foreground_weight where a pixel differs from its frame's median colour."""
    if not foreground_weight:  # the unweighted loss: no per-frame median in the training step
        return torch.ones_like(pixels[:, :1], dtype=torch.float32)
    median = pixels.float().flatten(3).median(dim=3).values[..., None, None]
    foreground = (pixels.float() - median).abs().amax(dim=1, keepdim=True) > FOREGROUND_DISTANCE
    return 1.0 + foreground_weight * foreground.float()


def reconstruction_loss(vae: AutoencoderKLWan, pixels: torch.Tensor, kl_weight: float,
                        foreground_weight: float = 0.0) -> tuple[torch.Tensor, float]:
    """(loss, PSNR in dB of this batch's reconstruction); the KL is per latent element, the L1 + MSE
    terms a weighted mean with foreground pixels counting 1 + foreground_weight times."""
    posterior = vae.encode(pixels).latent_dist
    decoded = vae.decode(posterior.sample()).sample
    error = decoded.float() - pixels.float()
    squared = error.pow(2)
    mse = squared.mean()
    kl = 0.5 * (posterior.mean.float().pow(2) + posterior.var.float() - 1.0 - posterior.logvar.float()).mean()
    weights = foreground_weights(pixels, foreground_weight)
    per_pixel = (error.abs() + squared).mean(dim=1, keepdim=True)
    loss = (per_pixel * weights).sum() / weights.sum() + kl_weight * kl
    psnr = float(10 * torch.log10(4.0 / mse.detach().clamp_min(1e-10)))  # peak-to-peak 2 in [-1, 1]
    return loss, psnr


def train_autoencoder(vae: AutoencoderKLWan, batches: ClipBatch, steps: int, learning_rate: float,
                      kl_weight: float, device: torch.device, log_every: int = 100,
                      foreground_weight: float = 0.0) -> list[float]:
    """Trains `vae` in place on batches(step); returns the PSNR of every step."""
    vae.to(device).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, max(1, steps // 20), steps, "cosine"))
    use_bf16 = device.type == "cuda"
    history: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        pixels = batches(step).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16):
            loss, psnr = reconstruction_loss(vae, pixels, kl_weight, foreground_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(psnr)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log.info("vae step %d/%d: loss %.4f, PSNR %.1f dB (%.1f steps/s)", step + 1, steps, loss.item(), psnr,
                     (step + 1) / (time.perf_counter() - started))
    vae.eval().requires_grad_(False)
    return history


@torch.no_grad()
def set_latent_statistics(vae: AutoencoderKLWan, samples: list[torch.Tensor]) -> None:
    """Stores the per-channel mean and std of the posterior means of `samples` in vae.config."""
    means = [vae.encode(pixels.to(vae.device)).latent_dist.mode().float() for pixels in samples]
    flat = torch.cat([m.transpose(0, 1).reshape(m.shape[1], -1) for m in means], dim=1)
    vae.register_to_config(latents_mean=flat.mean(1).tolist(), latents_std=flat.std(1).clamp_min(1e-3).tolist())


@torch.no_grad()
def reconstruct(vae: AutoencoderKLWan, pixels: torch.Tensor) -> torch.Tensor:
    """The posterior mean decoded again, [1, 3, T, H, W] in [-1, 1] on pixels' device."""
    device = next(vae.parameters()).device
    latents = vae.encode(pixels.to(device)).latent_dist.mode()
    return vae.decode(latents).sample.float().clamp(-1, 1).to(pixels.device)


def clip_psnr(originals: list[torch.Tensor], reconstructions: list[torch.Tensor]) -> tuple[float, float]:
    """(first-frame PSNR, all-frames PSNR) in dB over whole clips [1, 3, T, H, W] in [-1, 1]."""
    first, every = [], []
    for pixels, decoded in zip(originals, reconstructions):
        error = (decoded.float() - pixels.float()).pow(2)
        first.append(float(10 * torch.log10(4.0 / error[:, :, 0].mean().clamp_min(1e-10))))
        every.append(float(10 * torch.log10(4.0 / error.mean().clamp_min(1e-10))))
    return sum(first) / len(first), sum(every) / len(every)
