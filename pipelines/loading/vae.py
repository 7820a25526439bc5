"""Wan VAE (diffusers AutoencoderKLWan) with latent normalisation and a streaming decoder.

The Wan decoder is causal in time: it decodes one latent frame at a time and keeps a
small cache of the last feature frames of every causal conv. StreamingDecoder keeps that
cache alive between blocks, so decoding a video block by block yields exactly the frames
of a one-shot decode. The first latent frame yields 1 video frame, every later one 4.

For small GPUs the decoder can also run "frame by frame": after each time upsampling, the later
stages take one video frame at a time. Causal convs with a cache give the same output whatever the
chunk length (that is how one latent frame at a time works), so this only shrinks the transient
full-resolution activations (4 frames -> 1); the conv caches themselves are unchanged.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import CACHE_T, WanCausalConv3d, WanUpBlock


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

    def stream(self, frame_by_frame: bool = False) -> "StreamingDecoder":
        return StreamingDecoder(self, frame_by_frame)

    def stream_encoder(self) -> "StreamingEncoder":
        return StreamingEncoder(self)


class StreamingEncoder:
    """Encodes a video as its frames arrive, carrying the causal conv cache between calls: the first frame alone,
    then four frames per latent frame, the chunks a one-shot encode takes, so the latents are that encode's."""

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self.feature_cache: list = [None] * vae.model._cached_conv_counts["encoder"]
        self.frames_seen = 0

    @torch.no_grad()
    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, T, H, W] in [-1, 1], the next T video frames (1 + 4k for the first call, then 4k) ->
        normalised latents [B, 16, T', H/8, W/8] (the posterior mean)."""
        frames = pixels.shape[2]
        first = 1 if self.frames_seen == 0 else 0
        if frames < first or (frames - first) % 4:
            raise ValueError(f"the encoder takes 1 + 4k frames first and 4k after, got {frames}")
        model, x = self.vae.model, pixels.to(self.vae.device, self.vae.dtype)
        bounds = ([0, 1] if first else [0]) + list(range(first + 4, frames + 1, 4))
        chunks = [model.encoder(x[:, :, start:end], feat_cache=self.feature_cache, feat_idx=[0])
                  for start, end in zip(bounds, bounds[1:])]
        self.frames_seen += frames
        moments = model.quant_conv(torch.cat(chunks, dim=2))
        latents = moments[:, :moments.shape[1] // 2]  # (the diagonal Gaussian's mean: its mode)
        mean, std = self.vae._stats(latents)
        return (latents - mean) / std


class StreamingDecoder:
    """Decodes latent blocks in order, carrying the causal conv cache between blocks."""

    def __init__(self, vae: WanVAE, frame_by_frame: bool = False) -> None:
        self.vae = vae
        self.feature_cache: list = [None] * vae.num_decoder_convs
        self.frames_seen = 0
        # Wan2.2's residual up blocks treat a first chunk as a whole: they decode in one piece.
        self.frame_by_frame = frame_by_frame and all(isinstance(b, WanUpBlock) for b in vae.model.decoder.up_blocks)
        self._stages = self._build_stages() if self.frame_by_frame else []

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 16, T, h, w] (the next T latent frames) -> pixels [B, 3, T', H, W] in [-1, 1]."""
        model = self.vae.model
        z = latents.to(self.vae.device, self.vae.dtype)
        mean, std = self.vae._stats(z)
        x = model.post_quant_conv(z * std + mean)
        outputs = []
        for i in range(x.shape[2]):
            # contiguous: one memory layout per frame whatever the block length (no compiled variants per length)
            frame, first_chunk = x[:, :, i:i + 1].contiguous(), self.frames_seen == 0
            if self.frame_by_frame:
                outputs.append(self._decode_frame_by_frame(frame, 0, 0, first_chunk))
            else:
                outputs.append(model.decoder(frame, feat_cache=self.feature_cache, feat_idx=[0],
                                             first_chunk=first_chunk))
            self.frames_seen += 1
        return torch.cat(outputs, dim=2).clamp(-1.0, 1.0)

    def _build_stages(self) -> list:
        """The decoder's forward as a list of stages f(x, conv_index, first_chunk) in execution order."""
        decoder, cache = self.vae.model.decoder, self.feature_cache
        stages = [lambda x, index, first: _cached_conv(decoder.conv_in, x, cache, index),
                  lambda x, index, first: decoder.mid_block(x, feat_cache=cache, feat_idx=index)]
        for block in decoder.up_blocks:
            stages.append(lambda x, index, first, block=block: block(x, feat_cache=cache, feat_idx=index,
                                                                      first_chunk=first))
        stages.append(lambda x, index, first: _cached_conv(
            decoder.conv_out, decoder.nonlinearity(decoder.norm_out(x)), cache, index))
        return stages

    def _decode_frame_by_frame(self, x: torch.Tensor, stage: int, conv_index: int, first_chunk: bool) -> torch.Tensor:
        """Runs stages from `stage` on. Before the two full-size up blocks and the output head, a
        multi-frame activation continues one frame at a time, each frame through every later stage
        before the next (every conv still sees its frames in order)."""
        stages = self._stages
        index = [conv_index]
        for position in range(stage, len(stages)):
            if x.shape[2] > 1 and position >= len(stages) - 3:  # the two largest up blocks and the head
                start = index[0]
                return torch.cat([self._decode_frame_by_frame(x[:, :, t:t + 1], position, start, first_chunk)
                                  for t in range(x.shape[2])], dim=2)
            x = stages[position](x, index, first_chunk)
        return x


def _cached_conv(conv: WanCausalConv3d, x: torch.Tensor, cache: list, index: list[int]) -> torch.Tensor:
    """A causal conv fed from and refilling its slot of the decoder's cache, as diffusers' decoder does
    for its first and last conv (the last two input frames are kept)."""
    slot = index[0]
    tail = x[:, :, -CACHE_T:].clone()
    if tail.shape[2] < CACHE_T and cache[slot] is not None:
        tail = torch.cat([cache[slot][:, :, -1:].to(tail.device), tail], dim=2)
    out = conv(x, cache[slot])
    cache[slot] = tail
    index[0] += 1
    return out


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """[1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    return uint8_frames_on_device(pixels).cpu().numpy()


def uint8_frames_on_device(pixels: torch.Tensor) -> torch.Tensor:
    """to_uint8_frames where the pixels are (a decoding rank sends them from its GPU)."""
    video = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(1, 2, 3, 0).contiguous()


def frames_psnr(got: np.ndarray, want: np.ndarray) -> float:
    """PSNR (dB) of uint8 frames against reference frames; inf when identical."""
    mse = float(np.mean((got.astype(np.float64) - want.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
