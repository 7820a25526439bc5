"""Wan VAE (diffusers AutoencoderKLWan) with latent normalisation and a streaming decoder.

The Wan decoder is causal in time: it decodes one latent frame at a time and keeps a
small cache of the last feature frames of every causal conv. StreamingDecoder keeps that
cache alive between blocks, so decoding a video block by block yields exactly the frames
of a one-shot decode. The first latent frame yields 1 video frame, every later one 4.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKLWan


def frames_for_latents(latent_frames: int) -> int:
    """Video frames produced by decoding latent_frames Wan latents (1 + 4 per later frame)."""
    return 0 if latent_frames <= 0 else 1 + 4 * (latent_frames - 1)


class WanVAE:
    """Normalised encode/decode around AutoencoderKLWan (latents are (z - mean) / std)."""

    def __init__(self, model: AutoencoderKLWan) -> None:
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.num_decoder_convs = model._cached_conv_counts["decoder"]

    @property
    def device(self) -> torch.device:
        return self.model.post_quant_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.post_quant_conv.weight.dtype

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean.to(like.device, like.dtype), self.std.to(like.device, like.dtype)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, 16, T', H/8, W/8] (posterior mean)."""
        moments = self.model.encode(pixels.to(self.device, self.dtype)).latent_dist.mode()
        mean, std = self._stats(moments)
        return (moments - mean) / std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """One-shot decode of normalised latents [B, 16, T, h, w] -> pixels in [-1, 1]."""
        z = latents.to(self.device, self.dtype)
        mean, std = self._stats(z)
        return self.model.decode(z * std + mean).sample

    def stream(self) -> "StreamingDecoder":
        return StreamingDecoder(self)


class StreamingDecoder:
    """Decodes latent blocks in order, carrying the causal conv cache between blocks."""

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self.feature_cache: list = [None] * vae.num_decoder_convs
        self.frames_seen = 0

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 16, T, h, w] (the next T latent frames) -> pixels [B, 3, T', H, W] in [-1, 1]."""
        model = self.vae.model
        z = latents.to(self.vae.device, self.vae.dtype)
        mean, std = self.vae._stats(z)
        x = model.post_quant_conv(z * std + mean)
        outputs = []
        for i in range(x.shape[2]):
            conv_index = [0]
            # contiguous: one memory layout per frame whatever the block length (no compiled variants per length)
            outputs.append(model.decoder(x[:, :, i:i + 1].contiguous(), feat_cache=self.feature_cache,
                                         feat_idx=conv_index, first_chunk=self.frames_seen == 0))
            self.frames_seen += 1
        return torch.cat(outputs, dim=2).clamp(-1.0, 1.0)


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """[1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    video = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(1, 2, 3, 0).cpu().numpy()
