"""The KV cache of Rolling Forcing (TencentARC/RollingForcing, wan/modules/causal_model.py), for RollingWindowSampler.

Two kinds of pass use it. A *window pass* denoises several blocks at staggered noise levels together; its queries
attend to the anchor (the video's first block), the most recent clean frames and the window's own frames, with at
most `attend_frames` frames in all, and it stores nothing. The anchor's keys are moved to the positions just before
the recent frames, so every key position stays contiguous however far the video has gone. A *clean pass* (the
core's cache write of a finished block) stores the block and attends to the last `attend_frames` clean frames,
itself included, at their own positions: a rolling window without a sink (the anchor counts only while it is among
those frames). Their cache also keeps a few more frames than it attends to; that changes nothing, so it is left out.
"""
from __future__ import annotations

import torch

from .kv_cache import AttentionWindow, KVCache
from .rope import RotaryEmbedding3D, apply_rotary


class RollingForcingCache:
    """Clean passes (begin/update/commit, as the model calls any cache) store into a rolling KVCache of the last
    `attend_frames` frames; window_pass() gives the read-only view a window pass attends through."""

    relative_positions = False

    def __init__(self, num_layers: int, batch: int, frame_tokens: int, num_heads: int, head_dim: int,
                 attend_frames: int, anchor_frames: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self._settings = (num_layers, batch, frame_tokens, num_heads, head_dim, attend_frames, anchor_frames, dtype,
                          device)
        self.clean = KVCache(num_layers, batch, attend_frames, frame_tokens, num_heads, head_dim,
                             AttentionWindow(attend_frames, 0), dtype, device)
        self.frame_tokens, self.attend_frames, self.anchor_frames = frame_tokens, attend_frames, anchor_frames
        self.anchor: tuple[torch.Tensor, torch.Tensor] | None = None  # [layers, B, tokens, H, D], rotated at frame 0
        self._writing_anchor = False  # the pass under way writes the first block

    def empty_like(self) -> "RollingForcingCache":
        return RollingForcingCache(*self._settings)

    @property
    def global_end(self) -> int:
        return self.clean.global_end

    def advance_to(self, start_token: int) -> None:
        self.clean.advance_to(start_token)

    def begin(self, start_token: int, num_tokens: int) -> None:
        self.clean.begin(start_token, num_tokens)
        self._writing_anchor = start_token == 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clean.update(layer, k, v)

    def commit(self, start_token: int, num_tokens: int) -> None:
        self.clean.commit(start_token, num_tokens)
        if self._writing_anchor:  # the first block: kept as the anchor after it leaves the rolling window
            tokens = self.anchor_frames * self.frame_tokens
            self.anchor = (self.clean.keys[:, :, :tokens].clone(), self.clean.values[:, :, :tokens].clone())

    def window_pass(self, rope: RotaryEmbedding3D, height: int, width: int) -> "WindowPass":
        """The view for one window pass (height, width: the latent grid after patching)."""
        return WindowPass(self, rope, height, width)


class WindowPass:
    """A window pass's keys: [anchor moved before the recent frames, recent clean frames, the window], nothing
    stored. A window that starts at frame 0 attends to itself only."""

    relative_positions = False

    def __init__(self, cache: RollingForcingCache, rope: RotaryEmbedding3D, height: int, width: int) -> None:
        self.cache, self.rope, self.grid = cache, rope, (height, width)

    def begin(self, start_token: int, num_tokens: int) -> None:
        cache, tokens = self.cache, self.cache.frame_tokens
        clean = cache.clean
        self.recent, self.anchor_rope = (0, 0), None
        if start_token == 0 or cache.anchor is None:
            return
        window_frames, anchor_frames = num_tokens // tokens, cache.anchor_frames
        budget = cache.attend_frames - window_frames - anchor_frames  # recent frames that fit beside them
        first_stored = (clean.global_end - clean.local_end) // tokens  # video frame of the cache's first slot
        stored = clean.local_end // tokens - max(0, anchor_frames - first_stored)  # not counting the anchor's frames
        recent = max(0, min(budget, stored))
        self.recent = (clean.local_end - recent * tokens, clean.local_end)
        shift = start_token // tokens - recent - anchor_frames
        self.anchor_rope = self.rope.temporal_shift(anchor_frames, *self.grid, shift, device=clean.keys.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.anchor_rope is None:
            return k, v
        start, end = self.recent
        anchor_k, anchor_v = self.cache.anchor
        keys = [apply_rotary(anchor_k[layer], *self.anchor_rope), self.cache.clean.keys[layer][:, start:end], k]
        values = [anchor_v[layer], self.cache.clean.values[layer][:, start:end], v]
        return torch.cat(keys, dim=1), torch.cat(values, dim=1)

    def commit(self, start_token: int, num_tokens: int) -> None:
        pass
