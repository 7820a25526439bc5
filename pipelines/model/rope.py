"""3D rotary position embedding of the Wan DiT, with a frame offset for causal blocks.

The head dimension is split into a temporal part and two spatial parts exactly as in
Wan2.1 (t = d - 4*(d//6), h = w = 2*(d//6)). Keys are rotated with their absolute frame
index, so a block generated at start frame k sees the same positions it would see inside
a full-sequence forward pass.
"""
from __future__ import annotations

import torch

MAX_POSITIONS = 4096  # latent frames: 16 minutes of video at 16 fps
ROPE_THETA = 10000.0


def _axis_angles(num_positions: int, dim: int) -> torch.Tensor:
    inv = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.outer(torch.arange(num_positions, dtype=torch.float64), inv)


class RotaryEmbedding3D:
    """Precomputed angles for the three axes; cheap to slice per forward call."""

    def __init__(self, head_dim: int) -> None:
        if head_dim % 2:
            raise ValueError(f"head_dim must be even, got {head_dim}")
        spatial = 2 * (head_dim // 6)
        temporal = head_dim - 2 * spatial
        self.angles = [_axis_angles(MAX_POSITIONS, d) for d in (temporal, spatial, spatial)]
        self._device_cache: dict[torch.device, list[torch.Tensor]] = {}

    def _angles_on(self, device: torch.device) -> list[torch.Tensor]:
        if device not in self._device_cache:
            self._device_cache[device] = [a.to(device) for a in self.angles]
        return self._device_cache[device]

    def cos_sin(self, frames: int, height: int, width: int, start_frame: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns cos/sin of shape [frames*height*width, 1, head_dim/2] in float32."""
        if start_frame + frames > MAX_POSITIONS:
            raise ValueError(f"video longer than {MAX_POSITIONS} latent frames is not supported")
        t_ang, h_ang, w_ang = self._angles_on(device)
        grid = torch.cat([
            t_ang[start_frame:start_frame + frames].view(frames, 1, 1, -1).expand(frames, height, width, -1),
            h_ang[:height].view(1, height, 1, -1).expand(frames, height, width, -1),
            w_ang[:width].view(1, 1, width, -1).expand(frames, height, width, -1),
        ], dim=-1).reshape(frames * height * width, 1, -1)
        return grid.cos().float(), grid.sin().float()

    def temporal_shift(self, frames: int, height: int, width: int, shift: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin that move keys already rotated for frames [0, frames) to [shift, shift + frames): the temporal
        angles of `shift` and no spatial rotation (rotations of one channel pair add up, and the spatial pairs
        already carry their positions)."""
        t_ang = self._angles_on(device)[0]
        temporal = t_ang[shift].expand(frames * height * width, -1)
        spatial = temporal.new_zeros(frames * height * width, sum(a.shape[1] for a in self.angles[1:]))
        grid = torch.cat([temporal, spatial], dim=-1)[:, None]
        return grid.cos().float(), grid.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates adjacent channel pairs of x [B, L, H, D] (interleaved complex layout, as in Wan)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
