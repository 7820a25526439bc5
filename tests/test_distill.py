"""ODE-regression distillation (training/distill.py): the teacher's recorded paths and the student's loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from training.data import collate
from training.distill import (
    euler_grid,
    ode_regression_loss,
    on_policy_paths,
    prefix_for,
    student_trajectories,
    teacher_trajectories,
)

SIGMAS = (1.0, 0.75, 0.5, 0.25)


class FullSequenceContext:
    """The sampling context without a KV cache: at every step one pass of `teacher` (a FlowStep-like forward) over
    the clean frames so far and the noisy block, with classifier-free guidance against `empty`. The reference for
    the teacher's KV-cached context, and the context of the toy teachers below."""

    def __init__(self, teacher, prompts, empty, guidance, prefix_frames, condition, total_frames) -> None:
        self.teacher, self.prompts, self.empty, self.guidance = teacher, prompts, empty, guidance
        self.prefix_frames, self.condition = prefix_frames, condition

    def follow(self, clean: torch.Tensor) -> None:
        self.clean = clean

    def flow(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        start = self.clean.shape[2]
        noisy = torch.cat([self.clean, x], dim=2)
        timesteps = torch.zeros(x.shape[0], noisy.shape[2], device=x.device)
        timesteps[:, start:] = sigma * 1000
        flow = self.teacher(noisy, timesteps, self.prompts, self.prefix_frames, pose_condition=self.condition)
        if self.guidance == 1.0:
            return flow[:, :, start:]
        empty = self.teacher(noisy, timesteps, self.empty, self.prefix_frames, pose_condition=self.condition)
        return (empty + self.guidance * (flow - empty))[:, :, start:]


class PointMassTeacher(nn.Module):
    """The exact velocity field of a world whose only video is `target`: (x_t - x0) / sigma. Records
    the clean context it was shown, to check that earlier blocks arrive clean."""

    frames_per_block = 3

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # a device for the sampler
        self.target = target
        self.contexts: list[torch.Tensor] = []

    def pose_condition(self, latents, prefix_frames, poses, reference_poses):
        return None

    def sampling_context(self, *args):
        return FullSequenceContext(self, *args)

    def forward(self, noisy, timesteps, prompts, prefix_frames, poses=None, reference_poses=None,
                pose_condition=None):
        sigma = (timesteps / 1000).clamp_min(1e-6)[:, None, :, None, None]
        noisy_from = int((timesteps[0] > 0).nonzero()[0])
        self.contexts.append(noisy[:, :, :noisy_from].clone())
        target = self.target[:, :, :noisy.shape[2]]
        flow = (noisy - target) / sigma
        return torch.where(timesteps[:, None, :, None, None] > 0, flow, torch.zeros_like(flow))


def test_euler_grid_holds_the_samplers_sigmas():
    grid = euler_grid(24, SIGMAS)
    assert grid[0] == 1 and grid[-1] == 0 and len(grid) == 25
    warped = euler_grid(4, (1.0, 0.9375, 0.3))  # off the grid: added where they fall, still descending
    assert warped.tolist() == [1.0, 0.9375, 0.75, 0.5, 0.3, 0.25, 0.0]


@pytest.mark.parametrize("prefix", [0, 1])
def test_teacher_paths_follow_the_ode_and_end_on_its_video(prefix):
    target = torch.randn(2, 4, 1 + 6, 3, 5)
    teacher = PointMassTeacher(target)
    clean, paths = teacher_trajectories(teacher, target, torch.zeros(2, 8, 4), prefix, SIGMAS, 8, 1.0,
                                        torch.Generator().manual_seed(0))
    frames = prefix + 6 if prefix else 6
    assert clean.shape == (2, 4, frames, 3, 5) and paths.shape == (2, 4, 4, frames, 3, 5)
    torch.testing.assert_close(clean, target[:, :, :frames], atol=1e-5, rtol=0)  # Euler is exact on straight paths
    noise = paths[:, 0, :, prefix:]
    assert abs(float(noise.std()) - 1) < 0.3  # sigma 1: the initial noise
    for slot, sigma in enumerate(SIGMAS):  # each recorded point lies on the straight path noise -> video
        expected = (1 - sigma) * target[:, :, prefix:frames] + sigma * noise
        torch.testing.assert_close(paths[:, slot, :, prefix:], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(paths[:, :, :, :prefix], target[:, None, :, :prefix].expand(-1, 4, -1, -1, -1, -1))
    for context in teacher.contexts:  # earlier blocks come back clean, as the KV cache holds them
        torch.testing.assert_close(context, target[:, :, :context.shape[2]], atol=1e-5, rtol=0)


def test_guidance_extrapolates_from_the_empty_prompt():
    class PromptShift(PointMassTeacher):
        def forward(self, noisy, timesteps, prompts, prefix_frames, poses=None, reference_poses=None,
                    pose_condition=None):
            return torch.full_like(noisy, float(prompts.abs().sum() > 0))  # 1 with the prompt, 0 without

    target = torch.zeros(1, 2, 3, 2, 2)
    generator = torch.Generator().manual_seed(0)
    plain, _ = teacher_trajectories(PromptShift(target), target, torch.ones(1, 4, 4), 0, SIGMAS, 4, 1.0, generator)
    generator = torch.Generator().manual_seed(0)
    guided, _ = teacher_trajectories(PromptShift(target), target, torch.ones(1, 4, 4), 0, SIGMAS, 4, 3.0, generator)
    torch.testing.assert_close(plain - guided, torch.full_like(plain, 2.0))  # x -= 1 * flow over sigma 1 -> 0


@pytest.mark.parametrize("prefix,guidance,posed", [(0, 3.0, False), (1, 1.0, False), (1, 3.0, True)])
def test_the_kv_cached_teacher_records_the_paths_of_full_passes(random_components, prefix, guidance, posed):
    """The teacher's sampling context (KV caches of the clean frames, the noisy block alone at each step) against
    one full block-causal pass per step: the same paths up to rounding, on the tiny model with random weights
    (text-to-video with guidance, image-to-video, pose animation)."""
    from pipelines.pose.condition import PoseEncoders
    from training.train import FlowStep

    generator = random_components.generator.float()
    torch.manual_seed(0)
    teacher = FlowStep(generator, frames_per_block=3, text_len=8,
                       pose_encoders=PoseEncoders(generator.config.dim) if posed else None)
    latents = torch.randn(2, 16, prefix + 9, 8, 12, generator=torch.Generator().manual_seed(0))
    prompts = torch.randn(2, 8, generator.config.text_dim, generator=torch.Generator().manual_seed(1))
    unconditional = torch.randn(8, generator.config.text_dim, generator=torch.Generator().manual_seed(2))
    rng = np.random.default_rng(0)
    poses = [rng.integers(0, 255, (33, 64, 96, 3), dtype=np.uint8) for _ in range(2)] if posed else None
    references = [rng.integers(0, 255, (64, 96, 3), dtype=np.uint8) for _ in range(2)] if posed else None

    def paths(full_passes: bool):
        if full_passes:
            teacher.sampling_context = lambda *args: FullSequenceContext(teacher, *args)
        try:
            return teacher_trajectories(teacher, latents, prompts, prefix, SIGMAS, 6, guidance,
                                        torch.Generator().manual_seed(3), poses, references, unconditional)
        finally:
            teacher.__dict__.pop("sampling_context", None)

    (cached, cached_paths), (full, full_paths) = paths(False), paths(True)
    torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(cached_paths, full_paths, atol=2e-5, rtol=1e-4)
    # Control: a context that never receives the clean frames makes another video after the first block.
    from training.distill import TeacherContext

    class Forgetful(TeacherContext):
        def follow(self, clean: torch.Tensor) -> None:
            if not self.caches:
                self._make_caches(clean)

    teacher.sampling_context = lambda *args: Forgetful(generator, 3, *args)
    forgetful, _ = paths(False)
    assert torch.allclose(forgetful[:, :, :prefix + 3], cached[:, :, :prefix + 3], atol=2e-5) or prefix
    assert not torch.allclose(forgetful[:, :, prefix + 3:], cached[:, :, prefix + 3:], atol=1e-3)


def test_the_student_loss_is_zero_only_on_the_teachers_paths():
    target = torch.randn(3, 4, 7, 3, 5)
    clean, paths = teacher_trajectories(PointMassTeacher(target), target, torch.zeros(3, 8, 4), 1, SIGMAS, 8, 1.0,
                                        torch.Generator().manual_seed(0))
    batch = {"latents": clean, "trajectory": paths, "prompts": torch.zeros(3, 8, 4)}
    exact = ode_regression_loss(PointMassTeacher(clean), batch, SIGMAS, 3, 1, torch.Generator().manual_seed(1), "cpu")
    wrong = ode_regression_loss(PointMassTeacher(torch.zeros_like(clean)), batch, SIGMAS, 3, 1,
                                torch.Generator().manual_seed(1), "cpu")
    assert float(exact) < 1e-8 and float(wrong) > 0.5


def test_the_students_own_pairs_follow_its_sampler_and_cost_nothing_before_training():
    """Preserve pairs (student_trajectories): at each sigma the sampler's input and the student's own
    prediction; the loss on them is zero for the model that made them, and not for another."""
    target = torch.randn(2, 4, 6, 3, 5)
    student = PointMassTeacher(target)  # predicts x0 = target at every sigma
    clean, inputs, targets = student_trajectories(student, target, torch.zeros(2, 8, 4), 0, SIGMAS,
                                                  torch.Generator().manual_seed(0))
    torch.testing.assert_close(clean, target, atol=1e-5, rtol=0)
    torch.testing.assert_close(targets, target[:, None].expand_as(targets), atol=1e-5, rtol=0)
    for slot, sigma in enumerate(SIGMAS[1:], 1):  # the prediction re-noised with fresh noise
        fresh = (inputs[:, slot] - (1 - sigma) * target) / sigma
        assert abs(float(fresh.std()) - 1) < 0.3
        assert not torch.allclose(fresh, inputs[:, 0])
    batch = {"latents": clean, "trajectory": inputs, "targets": targets, "prompts": torch.zeros(2, 8, 4)}
    same = ode_regression_loss(student, batch, SIGMAS, 3, 0, torch.Generator().manual_seed(1), "cpu")
    other = ode_regression_loss(PointMassTeacher(torch.zeros_like(target)), batch, SIGMAS, 3, 0,
                                torch.Generator().manual_seed(1), "cpu")
    assert float(same) < 1e-10 and float(other) > 0.5


def test_on_policy_targets_are_the_teachers_answers_at_the_students_inputs():
    target, drawn = torch.randn(2, 4, 6, 3, 5), torch.randn(2, 4, 6, 3, 5)
    student, teacher = PointMassTeacher(drawn), PointMassTeacher(target)  # they draw different videos
    clean, inputs, targets = on_policy_paths(student, teacher, target, torch.zeros(2, 8, 4), 0, SIGMAS, 8, 1.0,
                                             torch.Generator().manual_seed(0), torch.zeros(8, 4))
    torch.testing.assert_close(targets, target[:, None].expand_as(targets), atol=1e-5, rtol=0)  # exact ODE
    torch.testing.assert_close(clean, target, atol=1e-5, rtol=0)
    fresh = (inputs[:, 1] - (1 - SIGMAS[1]) * drawn) / SIGMAS[1]  # the student's chain: its own x0, re-noised
    assert abs(float(fresh.std()) - 1) < 0.3


def test_a_batch_mixing_teacher_paths_and_preserve_pairs_targets_each_its_own():
    path = {"latents": torch.ones(4, 6, 2, 2), "trajectory": torch.zeros(2, 4, 6, 2, 2), "prompt": torch.ones(3, 4)}
    pair = {**path, "targets": torch.full((2, 4, 6, 2, 2), 5.0)}
    batch = collate([path, pair], 8)
    assert batch["targets"][0].eq(1).all() and batch["targets"][1].eq(5).all()


def test_pose_clips_always_get_their_reference_and_others_a_seeded_share():
    assert all(prefix_for(i, True, 0.0, 0) == 1 for i in range(20))
    shares = [prefix_for(i, False, 0.4, 0) for i in range(2000)]
    assert 0.35 < sum(shares) / len(shares) < 0.45
    assert shares == [prefix_for(i, False, 0.4, 0) for i in range(2000)]
