"""Causal Wan2.1 DiT: per-frame timesteps, KV-cached block attention, cached text keys.

Parameter names follow diffusers' WanTransformer3DModel, so diffusers checkpoints load
as they are and original Wan / Self-Forcing checkpoints go through diffusers' own key
converter (see weights.py). The arithmetic follows the Wan2.1 / Self-Forcing reference:
adaLN modulation per latent frame, qk RMSNorm across heads, 3D RoPE, tanh-GELU FFN.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.utils.checkpoint import checkpoint

from .kv_cache import AttentionWindow, BlockCausalLayout, KVCache
from .rope import RotaryEmbedding3D, apply_rotary

if TYPE_CHECKING:
    from ..parallel.sequence import SequenceShard


def sinusoidal_embedding(dim: int, timesteps: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding: [cos, sin] of t * 10000^(-i/half), computed in float64."""
    half = dim // 2
    position = timesteps.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=position.device).div(half))
    angles = torch.outer(position, freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm that keeps the input dtype (Wan computes it in the activation dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.norm_k(self.to_k(context))), self.heads(self.to_v(context))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of q/k/v [B, L, H, D] followed by the output projection."""
        return self.to_out[0](attention(q, k, v, mask))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | BlockCausalLayout | None = None,
              kernel: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """q/k/v [B, L, H, D] -> [B, L, H*D] through fused SDPA (which wants heads before tokens), or
    through `kernel` (q/k/v [B, L, H, D] -> [B, L, H, D]) when unmasked and without autograd."""
    if kernel is not None and mask is None and not torch.is_grad_enabled():
        return kernel(q, k, v).flatten(2)
    if isinstance(mask, BlockCausalLayout):  # each block's queries over the keys up to its end
        starts = (0, *mask.token_ends[:-1])
        return torch.cat([attention(q[:, s:e], k[:, :e], v[:, :e]) for s, e in zip(starts, mask.token_ends)], dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([_Proj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.net[0].proj
        if x.is_cuda and type(up) is nn.Linear and not torch.is_grad_enabled():
            # Inference only (the fused op has no backward; a LoRA wrapper or an FP8 layer runs its own forward):
            # cuBLASLt applies the tanh GELU in the GEMM epilogue, saving a pass over the
            # 5.8x wider hidden activation (on the CPU this op would use the exact GELU).
            hidden = torch._addmm_activation(up.bias, x.flatten(0, -2), up.weight.t(), use_gelu=True)
            return self.net[2](hidden.unflatten(0, x.shape[:-1]))
        return self.net[2](F.gelu(up(x), approximate="tanh"))


class _Proj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)


@dataclass
class RopeTables:
    """Rotary cos/sin for the queries and for the keys as they are written (the same tables, or no rotation when
    the KV cache positions its keys itself: relative positions)."""

    cos: torch.Tensor
    sin: torch.Tensor
    key_cos: torch.Tensor
    key_sin: torch.Tensor


class CausalWanBlock(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float, qk_norm: bool,
                 cross_attn_norm: bool) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = Attention(dim, num_heads, eps, qk_norm)
        self.norm2 = LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.attn2 = Attention(dim, num_heads, eps, qk_norm)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)
        self.self_attention_kernel = None  # inference kernel over the KV cache (attention_kernels.py); None: SDPA

    def forward(self, x: torch.Tensor, frame_mod: torch.Tensor, rope: RopeTables,
                context_kv: tuple[torch.Tensor, torch.Tensor], layer: int,
                kv_cache: KVCache | None, mask: torch.Tensor | BlockCausalLayout | None,
                shard: "SequenceShard | None" = None, frame_tokens: int = 0) -> torch.Tensor:
        """x [B, F*S, C]; frame_mod [B, F, 6, C] (one modulation per latent frame). With a shard x holds this rank's
        share of each frame's frame_tokens tokens, and self-attention runs on this rank's heads of all of them."""
        mods = (self.scale_shift_table.unsqueeze(1) + frame_mod).chunk(6, dim=2)
        q, k, v = self.project_self(x, mods[0], mods[1], rope.cos, rope.sin, rope.key_cos, rope.key_sin)
        frames = frame_mod.shape[1]
        if shard is not None:
            q, k, v = (shard.heads_from_tokens(t, frames, frame_tokens) for t in (q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        attended = attention(q, k, v, mask, self.self_attention_kernel)
        if shard is not None:
            attended = shard.tokens_from_heads(attended, frames, frame_tokens)
        return self.finish(x, attended, mods, context_kv)

    def project_self(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, key_cos: torch.Tensor,
                     key_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Static-shape part before self-attention: adaLN, q/k/v, qk-norm, RoPE."""
        h = _modulate(self.norm1(x), shift, scale)
        attn = self.attn1
        q = apply_rotary(attn.heads(attn.norm_q(attn.to_q(h))), cos, sin)
        k = apply_rotary(attn.heads(attn.norm_k(attn.to_k(h))), key_cos, key_sin)
        return q, k, attn.heads(attn.to_v(h))

    def finish(self, x: torch.Tensor, attended: torch.Tensor, mods: tuple[torch.Tensor, ...],
               context_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Static-shape part after self-attention: output gate, cross-attention, FFN."""
        _, _, gate, c_shift, c_scale, c_gate = mods
        x = x + _gated(self.attn1.to_out[0](attended), gate)
        q = self.attn2.heads(self.attn2.norm_q(self.attn2.to_q(self.norm2(x))))
        x = x + self.attn2.attend(q, *context_kv)
        return x + _gated(self.ffn(_modulate(self.norm3(x), c_shift, c_scale)), c_gate)

    def compile_static_parts(self, **options) -> None:
        """torch.compile the parts whose shapes never change; attention over the growing cache stays eager.
        Compiling again replaces the earlier compilation (e.g. after the weights were quantized)."""
        self.drop_compiled_parts()
        for name in ("project_self", "finish"):
            setattr(self, name, torch.compile(getattr(self, name), **options))

    def drop_compiled_parts(self) -> None:
        """Back to the eager methods (the compiled ones are instance attributes shadowing them)."""
        for name in ("project_self", "finish"):
            self.__dict__.pop(name, None)


def _modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-frame adaLN: h [B, F*S, C], shift/scale [B, F, 1, C]."""
    return (h.unflatten(1, (shift.shape[1], -1)) * (1 + scale) + shift).flatten(1, 2)


def _gated(h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return (h.unflatten(1, (gate.shape[1], -1)) * gate).flatten(1, 2)


class CausalWanModel(ModelMixin, ConfigMixin):
    """Wan2.1 text-to-video DiT run block-causally (Self-Forcing inference)."""

    _no_split_modules = ["CausalWanBlock"]

    @register_to_config
    def __init__(self, dim: int = 1536, ffn_dim: int = 8960, num_heads: int = 12, num_layers: int = 30,
                 in_dim: int = 16, out_dim: int = 16, patch_size: tuple[int, int, int] = (1, 2, 2),
                 text_len: int = 512, text_dim: int = 4096, freq_dim: int = 256, eps: float = 1e-6,
                 qk_norm: bool = True, cross_attn_norm: bool = True) -> None:
        super().__init__()
        self.patch = tuple(patch_size)
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch, stride=self.patch)
        self.condition_embedder = nn.Module()
        self.condition_embedder.time_embedder = _TwoLayer(freq_dim, dim, nn.SiLU())
        self.condition_embedder.time_proj = nn.Linear(dim, dim * 6)
        self.condition_embedder.text_embedder = _TwoLayer(text_dim, dim, nn.GELU(approximate="tanh"))
        self.blocks = nn.ModuleList([
            CausalWanBlock(dim, ffn_dim, num_heads, eps, qk_norm, cross_attn_norm) for _ in range(num_layers)
        ])
        self.norm_out = LayerNorm(dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, math.prod(self.patch) * out_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)
        self.rope = RotaryEmbedding3D(dim // num_heads)
        self.weight_streamer = None  # a weight_streaming.BlockStreamer when blocks live in CPU memory
        self.gradient_checkpointing = False  # training: recompute blocks in the backward pass ...
        self.checkpointed_blocks: int | None = None  # ... only the first N of them (None: all)
        self.sequence_shard: SequenceShard | None = None  # inference split over ranks (parallel/sequence.py)

    @property
    def head_dim(self) -> int:
        return self.config.dim // self.config.num_heads

    def set_attention_kernel(self, kernel: Callable[..., torch.Tensor] | None) -> None:
        """Every block's self-attention over the KV cache through `kernel` at inference (None: SDPA).

        The cross-attention (a few hundred text keys) stays on SDPA inside the compiled block part:
        there SDPA is the faster kernel, and an opaque call would split the compiled graph.
        """
        for block in self.blocks:
            block.self_attention_kernel = kernel

    @property
    def local_heads(self) -> int:
        """Heads whose keys and values this rank's KV cache holds (all of them unless split over ranks)."""
        shard = self.sequence_shard
        return self.config.num_heads if shard is None else self.config.num_heads // shard.size

    def new_kv_cache(self, max_frames: int, frame_tokens: int, window: AttentionWindow, device: torch.device,
                     fp8: bool = False, batch: int = 1) -> KVCache:
        """An empty KV cache for this model's inference passes (this rank's heads)."""
        return KVCache(*self.kv_cache_settings(max_frames, frame_tokens, window, device, fp8, batch))

    def kv_cache_settings(self, max_frames: int, frame_tokens: int, window: AttentionWindow, device: torch.device,
                          fp8: bool = False, batch: int = 1) -> tuple:
        """KVCache's arguments for new_kv_cache (a split generator's cache class takes them too)."""
        return (self.config.num_layers, batch, max_frames, frame_tokens, self.local_heads, self.head_dim, window,
                self.patch_embedding.weight.dtype, device, fp8)

    def compile_blocks(self, **options) -> None:
        for block in self.blocks:
            block.compile_static_parts(**options)

    def frame_tokens(self, latent_height: int, latent_width: int) -> int:
        return (latent_height // self.patch[1]) * (latent_width // self.patch[2])

    def encode_context(self, prompt_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer cross-attention keys/values for a prompt: computed once, reused by every block."""
        dtype = self.patch_embedding.weight.dtype
        padded = prompt_embeds.new_zeros(prompt_embeds.shape[0], self.config.text_len, prompt_embeds.shape[2])
        length = min(prompt_embeds.shape[1], self.config.text_len)
        padded[:, :length] = prompt_embeds[:, :length]
        context = self.condition_embedder.text_embedder(padded.to(dtype))
        streamer = self.weight_streamer
        keys_values = []
        for index, block in enumerate(self.blocks):
            with streamer.use(index) if streamer is not None else contextlib.nullcontext():
                keys_values.append(block.attn2.project_kv(context))
        return keys_values

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor,
                context_kv: list[tuple[torch.Tensor, torch.Tensor]], start_frame: int = 0,
                kv_cache: KVCache | None = None, attn_mask: torch.Tensor | BlockCausalLayout | None = None,
                token_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Flow prediction for latents [B, C, F, H, W] at per-frame timesteps [B, F].

        With kv_cache the frames are a block starting at start_frame that attends to the
        cache; without it this is a full-sequence pass, optionally block-causal via attn_mask.
        token_bias [B, F*S, dim] is added to the patch tokens (pose conditioning).
        """
        dtype = self.patch_embedding.weight.dtype
        batch, _, frames, height, width = latents.shape
        x = self.patch_embedding(latents.to(dtype))
        grid = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        if token_bias is not None:
            x = x + token_bias.to(dtype)

        time_emb = self.condition_embedder.time_embedder(
            sinusoidal_embedding(self.config.freq_dim, timesteps.flatten()).to(dtype))
        frame_mod = self.condition_embedder.time_proj(F.silu(time_emb)).unflatten(1, (6, -1))
        frame_mod = frame_mod.unflatten(0, (batch, frames))
        frame_tokens, num_tokens = grid[1] * grid[2], x.shape[1]
        if kv_cache is not None:
            kv_cache.begin(start_frame * frame_tokens, num_tokens)
        if kv_cache is not None and kv_cache.relative_positions:
            # Keys are stored unrotated and placed by their slot in the window; the block's queries follow them.
            window_frames, query_frame = kv_cache.window_frames()
            kv_cache.key_rope = self.rope.cos_sin(window_frames, *grid[1:], start_frame=0, device=x.device)
            cos, sin = self.rope.cos_sin(*grid, start_frame=query_frame, device=x.device)
            rope = RopeTables(cos, sin, torch.ones_like(cos), torch.zeros_like(sin))
        else:
            cos, sin = self.rope.cos_sin(*grid, start_frame=start_frame, device=x.device)
            rope = RopeTables(cos, sin, cos, sin)
        shard = self.sequence_shard
        if shard is not None:
            x = shard.local_tokens(x, frames)
            rope = RopeTables(*(shard.local_tokens(table, frames, dim=0) for table in
                                (rope.cos, rope.sin, rope.key_cos, rope.key_sin)))
        for layer, block in enumerate(self.blocks):
            recompute = self.checkpointed_blocks is None or layer < self.checkpointed_blocks
            if self.gradient_checkpointing and recompute and torch.is_grad_enabled():
                x = checkpoint(block, x, frame_mod, rope, context_kv[layer], layer, kv_cache, attn_mask,
                               use_reentrant=False)
            else:
                x = block(x, frame_mod, rope, context_kv[layer], layer, kv_cache, attn_mask, shard, frame_tokens)
        if kv_cache is not None:
            kv_cache.commit(start_frame * frame_tokens, num_tokens)

        shift, scale = (self.scale_shift_table.unsqueeze(1) + time_emb.unflatten(0, (batch, frames)).unsqueeze(2)).chunk(2, dim=2)
        x = (self.norm_out(x).unflatten(1, (frames, -1)) * (1 + scale) + shift).flatten(1, 2)
        x = self.proj_out(x)
        if shard is not None:
            x = shard.gather_tokens(x, frames, frame_tokens)
        return self._unpatchify(x, grid)

    def _unpatchify(self, x: torch.Tensor, grid: torch.Size) -> torch.Tensor:
        pt, ph, pw = self.patch
        f, h, w = grid
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], -1, f * pt, h * ph, w * pw)


class _TwoLayer(nn.Module):
    """Linear -> activation -> Linear, named as diffusers names it (linear_1 / linear_2)."""

    def __init__(self, dim_in: int, dim: int, activation: nn.Module) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.act = activation
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
