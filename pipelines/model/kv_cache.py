"""Self-attention KV cache for block-causal generation, and the equivalent attention mask.

The cache reproduces Self-Forcing's semantics: writing a block at the same start position
again (the denoising steps and the final clean pass) overwrites it in place; a block past
the end is appended; with a rolling window the oldest non-sink frames are evicted so that
the cache always holds the sink frames plus the most recent frames.

Reward Forcing (JaydenLyh/Reward-Forcing) changes two things about a rolling window, both chosen by
the AttentionWindow: keys are stored without their rotary position and placed by their slot in the
attended window at each pass (the block's queries right after them), so positions stay bounded however
long the video; and the sink becomes a running average of the frames the window evicts
(sink = m * sink + (1 - m) * evicted) instead of staying the video's first frames.

For small GPUs the stored frames can be kept in FP8 (e4m3) with one power-of-two scale per token
and head: half the memory of bf16. The block being written is always attended to at full
precision; only earlier frames go through FP8 (relative error <= 2**-4 per element).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .fp8 import FP8, quantize_fp8
from .rope import apply_rotary


@dataclass(frozen=True)
class AttentionWindow:
    """Which past frames a block may attend to (window_frames=None: all of them), and how they are presented:
    relative_positions places the keys by their slot in the window instead of their frame in the video;
    sink_momentum (with a sink) folds each evicted frame group into the sink by that running average."""

    window_frames: int | None = None
    sink_frames: int = 0
    relative_positions: bool = False
    sink_momentum: float | None = None

    def __post_init__(self) -> None:
        if self.window_frames is not None and not 0 <= self.sink_frames < self.window_frames:
            raise ValueError("sink_frames must be smaller than window_frames")
        if self.sink_momentum is not None and not (self.sink_frames and 0 <= self.sink_momentum <= 1):
            raise ValueError("sink_momentum needs sink frames and a value in [0, 1]")

    @classmethod
    def from_config(cls, local_attn_size: int, sink_size: int, relative_positions: bool = False,
                    sink_momentum: float | None = None) -> "AttentionWindow":
        """The configs' convention: local_attn_size -1 means full attention."""
        return cls(None if local_attn_size == -1 else local_attn_size, sink_size, relative_positions, sink_momentum)

    def frames_needed(self, latent_frames: int) -> int:
        """How many latent frames the cache must hold for a video of latent_frames."""
        return latent_frames if self.window_frames is None else min(latent_frames, self.window_frames)

    def narrowed(self, fitting_frames: int, frames_per_block: int) -> "AttentionWindow":
        """A rolling window of whole blocks (at least two) no longer than fitting_frames, keeping
        as many sink frames as still leave room for one block of recent frames."""
        frames = max(2 * frames_per_block, fitting_frames // frames_per_block * frames_per_block)
        return dataclasses.replace(self, window_frames=frames, sink_frames=min(self.sink_frames, frames - frames_per_block))


class KVCache:
    """Per-layer key/value buffers of one generation (never shared between sessions)."""

    def __init__(self, num_layers: int, batch: int, capacity_frames: int, frame_tokens: int,
                 num_heads: int, head_dim: int, window: AttentionWindow,
                 dtype: torch.dtype, device: torch.device | str, fp8: bool = False) -> None:
        if window.window_frames is not None:
            capacity_frames = min(capacity_frames, window.window_frames)
        self.frame_tokens = frame_tokens
        self.capacity = capacity_frames * frame_tokens
        self.rolling = window.window_frames is not None
        self.sink_tokens = window.sink_frames * frame_tokens
        self.relative_positions = window.relative_positions
        self.sink_momentum = window.sink_momentum
        self.key_rope: tuple[torch.Tensor, torch.Tensor] | None = None  # relative positions: cos/sin of the window's
        # slots, set by the model for each pass (window_frames() tells how many)
        self.fp8 = fp8
        shape = (num_layers, batch, self.capacity, num_heads, head_dim)
        self._settings = (num_layers, batch, capacity_frames, frame_tokens, num_heads, head_dim, window, dtype,
                          device, fp8)
        self.keys = torch.zeros(shape, dtype=FP8 if fp8 else dtype, device=device)
        self.values = torch.zeros(shape, dtype=FP8 if fp8 else dtype, device=device)
        if fp8:  # per token and head scales; one layer's dequantised keys/values for attention
            self.key_scales = torch.ones((*shape[:-1], 1), dtype=dtype, device=device)
            self.value_scales = torch.ones((*shape[:-1], 1), dtype=dtype, device=device)
            self._dequantised = torch.empty((2, *shape[1:]), dtype=dtype, device=device)
        self.global_end = 0
        self.local_end = 0
        self._write: tuple[int, int] | None = None
        self._evict: int = 0

    def empty_like(self) -> "KVCache":
        """A new, empty cache of the same size and window."""
        return KVCache(*self._settings)

    def advance_to(self, start_token: int) -> None:
        """Skips positions that are not stored (a rebuilt rolling cache jumps from its sink frames
        to the recent frames; their keys carry their own RoPE positions)."""
        if start_token < self.global_end:
            raise ValueError(f"cache already holds tokens up to {self.global_end}")
        self.global_end = start_token

    def begin(self, start_token: int, num_tokens: int) -> None:
        """Plans where tokens [start, start+num) go; called once per forward, before the layers."""
        end = start_token + num_tokens
        if start_token > self.global_end:
            raise ValueError(f"cache holds tokens up to {self.global_end}, cannot write at {start_token}")
        new_tokens = end - self.global_end if end > self.global_end else 0
        self._evict = 0
        if new_tokens and self.local_end + new_tokens > self.capacity:
            if not self.rolling:
                raise ValueError("KV cache is full; use a rolling attention window for longer videos")
            self._evict = self.local_end + new_tokens - self.capacity
        local_end = self.local_end + (end - self.global_end) - self._evict
        self._write = (local_end - num_tokens, local_end)

    def window_frames(self) -> tuple[int, int]:
        """After begin(): (the attended frames, the first frame of the block being written) as slots of the window,
        the positions a relative-position cache gives its keys and the block's queries."""
        assert self._write is not None, "begin() must be called first"
        return self._write[1] // self.frame_tokens, self._write[0] // self.frame_tokens

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores this layer's new keys/values and returns the keys/values to attend to."""
        assert self._write is not None, "begin() must be called before update()"
        local_start, local_end = self._write
        buffers = [self.keys[layer], self.values[layer]]
        if self.fp8:
            buffers += [self.key_scales[layer], self.value_scales[layer]]
        if self._evict:
            sink, evict = self.sink_tokens, self._evict
            if self.sink_momentum is not None:
                self._fold_into_sink(layer, evict)
            keep = self.local_end - evict - sink
            for buffer in buffers:
                buffer[:, sink:sink + keep] = buffer[:, sink + evict:sink + evict + keep].clone()
        if not self.fp8:
            buffers[0][:, local_start:local_end] = k
            buffers[1][:, local_start:local_end] = v
            return self._positioned(buffers[0][:, :local_end]), buffers[1][:, :local_end]
        attended = []
        for fresh, stored, scales, out in zip((k, v), buffers[:2], buffers[2:], self._dequantised):
            stored[:, local_start:local_end], scales[:, local_start:local_end] = quantize_fp8(fresh)
            out[:, :local_start].copy_(stored[:, :local_start]).mul_(scales[:, :local_start])
            out[:, local_start:local_end] = fresh
            attended.append(out[:, :local_end])
        return self._positioned(attended[0]), attended[1]

    def _positioned(self, keys: torch.Tensor) -> torch.Tensor:
        """The attended keys with their rotary positions: already applied when written (absolute positions), else
        applied now by slot (the model set key_rope for this pass)."""
        if not self.relative_positions:
            return keys
        assert self.key_rope is not None, "a relative-position cache needs key_rope for each pass"
        return apply_rotary(keys, *self.key_rope)

    def _fold_into_sink(self, layer: int, evict: int) -> None:
        """Reward Forcing's sink update, before the eviction: the running average of the sink and the evicted group
        when the group is as long as the sink; otherwise (their code's other branch) the group's first tokens
        replace the sink's."""
        sink = self.sink_tokens
        for index, stored in enumerate((self.keys[layer], self.values[layer])):
            scales = (self.key_scales, self.value_scales)[index][layer] if self.fp8 else None

            def read(start: int, end: int) -> torch.Tensor:
                return stored[:, start:end] if scales is None else stored[:, start:end].to(scales.dtype) * \
                    scales[:, start:end]

            evicted = read(sink, sink + evict)
            if evict == sink:
                merged = self.sink_momentum * read(0, sink) + (1 - self.sink_momentum) * evicted
            else:
                merged = evicted[:, :min(evict, sink)]
            if self.fp8:
                stored[:, :merged.shape[1]], scales[:, :merged.shape[1]] = quantize_fp8(merged)
            else:
                stored[:, :merged.shape[1]] = merged

    def commit(self, start_token: int, num_tokens: int) -> None:
        """Moves the end markers after every layer has written."""
        assert self._write is not None
        self.local_end = self._write[1]
        self.global_end = start_token + num_tokens
        self._write = None


def kv_bytes_per_frame(num_layers: int, dim: int, frame_tokens: int, dtype: torch.dtype,
                       fp8_heads: int | None = None) -> int:
    """Keys + values of one latent frame over all layers. With fp8_heads: stored in FP8 with one scale
    per token and head, plus the frame's share of the dequantisation workspace."""
    width = torch.finfo(dtype).bits // 8
    if fp8_heads is None:
        return frame_tokens * num_layers * 2 * dim * width
    workspace = 2 * dim * width  # one layer's keys and values dequantised for attention
    return frame_tokens * (num_layers * 2 * (dim + fp8_heads * width) + workspace)


@dataclass(frozen=True)
class BlockCausalLayout:
    """Full-sequence block-causal attention without a mask tensor: the tokens of each block attend to
    every token up to the end of their block. token_ends[i] is the end of block i (exclusive).
    Equal to block_causal_mask() with full attention, at flash-attention speed (training)."""

    token_ends: tuple[int, ...]

    @classmethod
    def of(cls, block_frames: list[int], frame_tokens: int) -> "BlockCausalLayout":
        ends, end = [], 0
        for frames in block_frames:
            end += frames * frame_tokens
            ends.append(end)
        return cls(tuple(ends))


def block_causal_mask(block_frames: list[int], frame_tokens: int, window: AttentionWindow,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [L, L] mask (True = attend) equal to what the KV cache lets each block see."""
    frame_ends = []
    end = 0
    for frames in block_frames:
        end += frames
        frame_ends += [end] * frames
    query_end = torch.tensor(frame_ends, device=device).repeat_interleave(frame_tokens)
    key_frame = torch.arange(sum(block_frames), device=device).repeat_interleave(frame_tokens)
    allowed = key_frame[None, :] < query_end[:, None]
    if window.window_frames is not None:
        recent = key_frame[None, :] >= (query_end[:, None] - (window.window_frames - window.sink_frames))
        sink = key_frame[None, :] < window.sink_frames
        allowed &= recent | sink
    return allowed
