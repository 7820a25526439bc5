"""A tiny streaming decoder with TAEHV's architecture, for the public taew2_1.pth (madebyollin/taehv).

It decodes the generator's (normalised) Wan 2.1 latents to pixels with ~1/40 of the full VAE's
work, at preview quality. The network is a stack of 2D convs; time enters only through
"memory blocks", which see their own input of the previous frame, and "time grow" layers, which
turn one frame into `stride` frames (1x1 conv to stride x channels). Layer indices follow the
checkpoint's keys (`decoder.N.*`), so the file loads as it is.

Streaming: a memory block needs only the previous frame's input, so a block of latent frames is
decoded in one pass per layer with the block's own frames shifted by one as memory; the last
input of each memory block is kept for the next block, per stream. Four frames come out per
latent frame; the first three of a stream are dropped, giving Wan's 1 + 4 (T - 1) frames.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

FILE_NAMES = ("taew2_1.safetensors", "taew2_1.pth")
WIDTHS = (256, 128, 64, 64)
TIME_UPSCALE = (False, True, True)  # taew2_1: 4x in time from the second and third stage


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class _SoftClamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemoryBlock(nn.Module):
    """relu(convs(cat(x, previous frame's x)) + x)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * width, width), nn.ReLU(), _conv(width, width), nn.ReLU(),
                                  _conv(width, width))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, past], 1)) + x)


class TimeGrow(nn.Module):
    """Each frame becomes `stride` consecutive frames (a 1x1 conv to stride x channels)."""

    def __init__(self, width: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(width, width * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TinyVideoDecoder(nn.Module):
    """The decoder half of TAEHV for 16-channel Wan 2.1 latents; outputs pixels in [-1, 1]."""

    def __init__(self, latent_channels: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = [_SoftClamp(), _conv(latent_channels, WIDTHS[0]), nn.ReLU()]
        for stage in range(3):
            width, following = WIDTHS[stage], WIDTHS[stage + 1]
            layers += [MemoryBlock(width), MemoryBlock(width), MemoryBlock(width), nn.Upsample(scale_factor=2),
                       TimeGrow(width, 2 if TIME_UPSCALE[stage] else 1), _conv(width, following, bias=False)]
        layers += [nn.ReLU(), _conv(WIDTHS[3], 3)]
        self.decoder = nn.Sequential(*layers)
        self.frames_to_trim = 2 ** sum(TIME_UPSCALE) - 1

    @classmethod
    def from_file(cls, path: Path) -> "TinyVideoDecoder":
        """Loads taew2_1.pth / .safetensors (the encoder half, if present, is not needed)."""
        from .weights import WeightsError, read_state

        state = read_state(path)
        problem = layout_problem({k: tuple(v.shape) for k, v in state.items()})
        if problem:
            raise WeightsError(not_a_decoder(path, problem))
        model = cls()
        expected = model.state_dict()
        # a time-grow layer trained with a larger stride keeps its last frame's channels
        model.load_state_dict({k: state[k][-expected[k].shape[0]:] for k in expected})
        return model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.decoder[1].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    def stream(self) -> "TinyDecoderStream":
        return TinyDecoderStream(self)


class TinyDecoderStream:
    """One video's decoding state (the memory blocks' last inputs); same interface as the Wan VAE's."""

    def __init__(self, model: TinyVideoDecoder) -> None:
        self.model = model
        self.memory: dict[int, torch.Tensor] = {}
        self.frames_seen = 0  # latent frames decoded
        self.frames_out = 0  # raw output frames, the trimmed start included

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 16, T, h, w] (the next T latent frames) -> pixels [B, 3, T', 8h, 8w] in [-1, 1]."""
        model = self.model
        x = latents.to(model.device, model.dtype).transpose(1, 2)  # [B, T, C, h, w]
        batch = x.shape[0]
        for index, layer in enumerate(model.decoder):
            if isinstance(layer, MemoryBlock):
                previous = self.memory.get(index, torch.zeros_like(x[:, :1]))
                past = torch.cat([previous, x[:, :-1]], 1)
                self.memory[index] = x[:, -1:]
                x = layer(x.flatten(0, 1), past.flatten(0, 1)).unflatten(0, (batch, -1))
            elif isinstance(layer, TimeGrow):
                grown = layer(x.flatten(0, 1))  # [B*T, stride*C, H, W]: frame t -> frames t*stride + k
                x = grown.unflatten(0, (batch, -1)).unflatten(2, (layer.stride, -1)).flatten(1, 2)
            else:
                x = layer(x.flatten(0, 1)).unflatten(0, (batch, -1))
        self.frames_seen += latents.shape[2]
        trim = max(0, model.frames_to_trim - self.frames_out)
        self.frames_out += x.shape[1]
        pixels = x[:, trim:].clamp(0, 1) * 2 - 1
        return pixels.transpose(1, 2)


def layout_problem(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why a checkpoint (tensor name -> shape) is no TAEHV decoder for Wan 2.1 latents; None when it is.
    A time-grow layer may have more output channels than needed (trained with a larger stride)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in TinyVideoDecoder().state_dict().items()}

    def fits(key: str) -> bool:
        found, wanted = shapes[key], expected[key]
        wider_time_grow = key.endswith(".conv.weight") and found[0] > wanted[0] and found[1:] == wanted[1:]
        return found == wanted or wider_time_grow

    missing = sorted(set(expected) - set(shapes))
    wrong = [f"{k}: file {shapes[k]} vs {expected[k]}" for k in expected if k in shapes and not fits(k)]
    return f"missing {missing[:3]}, wrong shape {wrong[:3]}" if missing or wrong else None


def not_a_decoder(path: Path, problem: str) -> str:
    return (f"{path} is not a TAEHV decoder for Wan 2.1 latents ({problem}). Download taew2_1.pth from "
            f"github.com/madebyollin/taehv.")


def find_tiny_decoder(weights_dir: Path | None) -> Path | None:
    """taew2_1 in the weights folder or its taehv/ subfolder."""
    if weights_dir is None:
        return None
    for folder in (weights_dir, weights_dir / "taehv"):
        for name in FILE_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None
