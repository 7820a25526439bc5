"""Pose conditioning for the causal generator, following UniAnimate-DiT's design for Wan.

- dwpose_embedding: a 3D-conv encoder over the rendered pose video (first frame repeated 3
  times in front, so 4n-3 pose frames give n latent frames) down to the patch-token grid and
  the model width; its tokens are added to the patch tokens of the frames they belong to.
  They are computed once for the whole sequence and each block takes only its own slice.
- randomref_embedding_pose: a 2D-conv encoder of the reference image's pose, at latent
  resolution, combined with the reference image latent that is prefilled into the KV cache
  as the first frame (as in image-to-video).

Pose weights load lazily, once, from a local file with keys 'dwpose_embedding.*' and
'randomref_embedding_pose.*'. A generator that was not trained with them cannot follow poses,
so the app refuses to run pose animation without such a file.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..loading.weights import WeightsError, read_state

log = logging.getLogger(__name__)
HIDDEN = 16


class PoseEncoders(nn.Module):
    """source_dim: the width the pose convs end in when it differs from the generator's (UniAnimate's
    public encoders are 5120 wide, for Wan 14B): a trainable 'pose_proj' maps it to model_dim."""

    def __init__(self, model_dim: int, latent_channels: int = 16, source_dim: int | None = None) -> None:
        super().__init__()
        width = source_dim or model_dim

        def conv3d(cin, cout, kernel=3, stride=1, padding=1):
            return nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding)

        self.dwpose_embedding = nn.Sequential(
            conv3d(3, HIDDEN), nn.SiLU(), conv3d(HIDDEN, HIDDEN), nn.SiLU(), conv3d(HIDDEN, HIDDEN), nn.SiLU(),
            conv3d(HIDDEN, HIDDEN, stride=(1, 2, 2)), nn.SiLU(),
            conv3d(HIDDEN, HIDDEN, stride=2), nn.SiLU(), conv3d(HIDDEN, HIDDEN, stride=2), nn.SiLU(),
            conv3d(HIDDEN, width, kernel=(1, 2, 2), stride=(1, 2, 2), padding=0))
        self.pose_proj = nn.Linear(width, model_dim) if width != model_dim else None
        self.randomref_embedding_pose = nn.Sequential(
            nn.Conv2d(3, HIDDEN, 3, padding=1), nn.SiLU(), nn.Conv2d(HIDDEN, HIDDEN, 3, padding=1), nn.SiLU(),
            nn.Conv2d(HIDDEN, HIDDEN, 3, padding=1), nn.SiLU(), nn.Conv2d(HIDDEN, HIDDEN, 3, stride=2, padding=1),
            nn.SiLU(), nn.Conv2d(HIDDEN, HIDDEN, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(HIDDEN, latent_channels, 3, stride=2, padding=1))

    def pose_tokens(self, pose_video: np.ndarray) -> torch.Tensor:
        """uint8 [F, H, W, 3] pose frames (F = 4n-3), or a batch [B, F, H, W, 3] of them ->
        tokens [B, n*(H/16)*(W/16), dim] (B = 1 for one video)."""
        frames = np.asarray(pose_video)
        frames = frames if frames.ndim == 5 else frames[None]
        return self.padded_pose_tokens(np.concatenate([frames[:, :1].repeat(3, axis=1), frames], axis=1))

    def padded_pose_tokens(self, padded_video: np.ndarray) -> torch.Tensor:
        """pose_tokens of frames that already carry the first frame's three repeats in front, uint8 [B, 4n, H, W, 3]
        (live.StreamingPoseConditioning encodes windows of a video that is still arriving)."""
        weight = self.dwpose_embedding[0].weight
        video = torch.from_numpy(padded_video).to(weight.device, weight.dtype).permute(0, 4, 1, 2, 3) / 255.0
        tokens = self.dwpose_embedding(video).flatten(2).transpose(1, 2)
        return tokens if self.pose_proj is None else self.pose_proj(tokens)

    def reference_features(self, reference_pose: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] (or a batch [B, H, W, 3]) -> [B, latent_channels, 1, H/8, W/8], added to the
        reference latent."""
        weight = self.randomref_embedding_pose[0].weight
        pixels = torch.tensor(np.asarray(reference_pose)).to(weight.device, weight.dtype)
        image = (pixels if pixels.ndim == 4 else pixels[None]).permute(0, 3, 1, 2) / 255.0
        return self.randomref_embedding_pose(image).unsqueeze(2)


def pose_width(state: dict[str, torch.Tensor]) -> int | None:
    """Output width of the pose video encoder in a saved state (its last conv)."""
    convs = sorted((k for k in state if k.startswith("dwpose_embedding.") and k.endswith(".weight")),
                   key=lambda k: int(k.split(".")[1]))
    return int(state[convs[-1]].shape[0]) if convs else None


class PoseConditioning:
    """Per-block pose tokens for one generation (satisfies core.BlockConditioning)."""

    def __init__(self, tokens: torch.Tensor, frame_tokens: int, prefix_frames: int) -> None:
        self.tokens = tokens
        self.frame_tokens = frame_tokens
        self.prefix_frames = prefix_frames

    @property
    def latent_frames(self) -> int:
        return self.tokens.shape[1] // self.frame_tokens

    def frames_ready(self, start_frame: int, num_frames: int) -> bool:
        return start_frame + num_frames - self.prefix_frames <= self.latent_frames

    def token_bias(self, start_frame: int, num_frames: int) -> torch.Tensor | None:
        if start_frame < self.prefix_frames:
            return None  # the reference frame carries its pose through reference_features
        first = start_frame - self.prefix_frames
        if first + num_frames > self.latent_frames:
            raise ValueError(f"pose sequence covers {self.latent_frames} latent frames, block needs up to "
                             f"{first + num_frames}")
        return self.tokens[:, first * self.frame_tokens:(first + num_frames) * self.frame_tokens]


class LazyPoseEncoders:
    """Loads the pose encoders on first use, once, from a local file (or seeded random weights)."""

    def __init__(self, model_dim: int, path: Path | None, device: torch.device | str, dtype: torch.dtype,
                 random_seed: int | None = None) -> None:
        self.model_dim = model_dim
        self.path = path
        self.device = device
        self.dtype = dtype
        self.random_seed = random_seed
        self.loads = 0
        self._encoders: PoseEncoders | None = None
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self.random_seed is not None or (self.path is not None and self.path.is_file())

    def missing_message(self) -> str:
        where = self.path or "<weights>/checkpoints/pose_encoders.safetensors"
        return (f"This model has no trained pose-conditioning weights ({where} not found). Pose animation needs a "
                f"causal Wan generator fine-tuned with UniAnimate-style pose encoders and the matching "
                f"'dwpose_embedding' / 'randomref_embedding_pose' weights; without them the video would not "
                f"follow the poses, so nothing is generated.")

    def get(self) -> PoseEncoders:
        with self._lock:
            if self._encoders is None:
                self._encoders = self._load()
                self.loads += 1
            return self._encoders

    def _load(self) -> PoseEncoders:
        state = read_state(self.path) if self.random_seed is None and self.available else None
        encoders = PoseEncoders(self.model_dim, source_dim=pose_width(state) if state else None)
        if self.random_seed is not None:
            rng = torch.Generator().manual_seed(self.random_seed)
            with torch.no_grad():
                for param in encoders.parameters():
                    param.copy_(torch.randn(param.shape, generator=rng) * 0.1)
        else:
            if not self.available:
                raise WeightsError(self.missing_message())
            expected = encoders.state_dict()
            missing = sorted(set(expected) - set(state))
            wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
            if missing or wrong:
                raise WeightsError(f"{self.path} does not fit the pose encoders of this model (dim "
                                   f"{self.model_dim}): missing {missing[:4]}, wrong shape {wrong[:4]}.")
            encoders.load_state_dict({k: state[k] for k in expected})
        log.info("pose encoders loaded (%s)", self.path or "random")
        return encoders.to(self.device, self.dtype).eval().requires_grad_(False)

