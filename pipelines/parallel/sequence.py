"""Ulysses sequence parallelism for the causal DiT: each rank holds a share of every frame's tokens.

Outside self-attention everything is per token (adaLN per frame, cross-attention, FFN), so a rank
works on its share alone. Around self-attention one all-to-all trades the token split for a head
split: each rank then holds every token of H/N heads, in the full sequence's order, so its KV cache
is an ordinary cache of H/N heads (windows, sinks and evictions work unchanged) and each head's
attention is the one-GPU computation. A second all-to-all trades back.

Shares are contiguous runs of each frame's tokens (rank r: tokens bounds[r]..bounds[r+1] of every
frame), so per-frame modulation keeps its layout and the gathered order is the original order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class SequenceShard:
    """This rank's place in a group that splits each generator pass (group None: the default group)."""

    def __init__(self, rank: int, size: int, group: dist.ProcessGroup | None = None) -> None:
        self.rank, self.size, self.group = rank, size, group

    def split_sizes(self, frame_tokens: int) -> list[int]:
        """Each rank's share of one frame's tokens (the first ranks take one more when it does not divide)."""
        base, extra = divmod(frame_tokens, self.size)
        return [base + (rank < extra) for rank in range(self.size)]

    def local_tokens(self, x: torch.Tensor, frames: int, dim: int = 1) -> torch.Tensor:
        """This rank's share of every frame of x (frames*tokens along `dim`)."""
        sizes = self.split_sizes(x.shape[dim] // frames)
        start = sum(sizes[:self.rank])
        per_frame = x.unflatten(dim, (frames, -1))
        return per_frame.narrow(dim + 1, start, sizes[self.rank]).flatten(dim, dim + 1)

    def gather_tokens(self, x: torch.Tensor, frames: int, frame_tokens: int) -> torch.Tensor:
        """Every rank's share of x [B, frames*share, C] put back together: [B, frames*frame_tokens, C]."""
        sizes = self.split_sizes(frame_tokens)
        largest = max(sizes)
        local = x.unflatten(1, (frames, -1))
        padded = local.new_zeros(local.shape[0], frames, largest, local.shape[3])
        padded[:, :, :local.shape[2]] = local
        gathered = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(gathered, padded.contiguous(), group=self.group)
        return torch.cat([part[:, :, :size] for part, size in zip(gathered, sizes)], dim=2).flatten(1, 2)

    def heads_from_tokens(self, x: torch.Tensor, frames: int, frame_tokens: int) -> torch.Tensor:
        """[B, frames*share, H, D] -> [B, frames*frame_tokens, H/N, D]: all tokens of this rank's heads."""
        batch, _, heads, head_dim = x.shape
        own = heads // self.size
        sizes = self.split_sizes(frame_tokens)
        local = x.unflatten(1, (frames, -1))  # [B, F, share, H, D]
        outgoing = torch.stack(local.split(own, dim=3)).contiguous()  # [N (head group), B, F, share, H/N, D]
        per_token = batch * frames * own * head_dim
        incoming = x.new_empty(sum(sizes) * per_token)
        dist.all_to_all_single(incoming, outgoing.flatten(), [size * per_token for size in sizes],
                               [sizes[self.rank] * per_token] * self.size, group=self.group)
        parts = [part.view(batch, frames, size, own, head_dim)
                 for part, size in zip(incoming.split([size * per_token for size in sizes]), sizes)]
        return torch.cat(parts, dim=2).flatten(1, 2)

    def tokens_from_heads(self, x: torch.Tensor, frames: int, frame_tokens: int) -> torch.Tensor:
        """[B, frames*frame_tokens, (H/N)*D] -> [B, frames*share, H*D]: every head of this rank's tokens."""
        batch, _, width = x.shape
        sizes = self.split_sizes(frame_tokens)
        per_token = batch * frames * width
        outgoing = torch.cat([part.contiguous().flatten() for part in x.unflatten(1, (frames, -1)).split(sizes, dim=2)])
        share = sizes[self.rank]
        incoming = x.new_empty(self.size * share * per_token)
        dist.all_to_all_single(incoming, outgoing, [share * per_token] * self.size,
                               [size * per_token for size in sizes], group=self.group)
        groups = incoming.view(self.size, batch, frames, share, width)  # [N (head group), B, F, share, (H/N)*D]
        return groups.permute(1, 2, 3, 0, 4).reshape(batch, frames * share, self.size * width)
