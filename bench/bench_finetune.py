"""GPU benchmark of the three stages of `python -m training.finetune` at full Wan2.1-T2V-1.3B size, random weights.

Batch 1, 81 frames at 832x480 (21 latent frames, 32760 tokens), bf16 through accelerate, the stage code itself:
  teacher  a LoRA flow-matching step on the multi-step teacher (training.train.FlowStep + flow_matching_loss)
  paths    one teacher video with its recorded path (training.distill.teacher_trajectories, guided Euler)
  student  a LoRA ODE-regression step on the few-step student (training.distill.ode_regression_loss)
and each stage's peak memory. From these and configs/finetune_lora.yaml it estimates the whole command's time
for --clips prepared clips (preparation not included).

    python bench/bench_finetune.py --out bench/results/h200_finetune_stages.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelerate import Accelerator  # noqa: E402

from pipelines.config import load_config  # noqa: E402
from pipelines.model.transformer import CausalWanModel  # noqa: E402
from training.adapters import add_lora  # noqa: E402
from training.config import load_finetune_config, load_training_config  # noqa: E402
from training.distill import euler_grid, ode_regression_loss, teacher_trajectories  # noqa: E402
from training.objective import FlowObjective, few_step_sigmas  # noqa: E402
from training.train import FlowStep, flow_matching_loss  # noqa: E402


def timed_steps(run_step, steps: int) -> tuple[list[float], float]:
    """(seconds of each step after 2 warm-up steps, peak allocated GiB)."""
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run_step(step)
        torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return times, torch.cuda.max_memory_allocated() / 2**30


def lora_model(accelerator: Accelerator, config, rank: int, checkpointed_blocks: int | None):
    with torch.device(accelerator.device):
        generator = CausalWanModel(**config.model).to(torch.bfloat16)
    generator.gradient_checkpointing = True
    generator.checkpointed_blocks = checkpointed_blocks
    params = add_lora(generator, rank, rank)
    step_module = FlowStep(generator, config.frames_per_block, config.model["text_len"]).to(accelerator.device)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    step_module, optimizer = accelerator.prepare(step_module, optimizer)
    return step_module, optimizer, params


def training_stage(accelerator, config, rank, checkpointed_blocks, loss_of, steps) -> dict:
    step_module, optimizer, params = lora_model(accelerator, config, rank, checkpointed_blocks)

    def step(index: int) -> None:
        loss = loss_of(step_module, torch.Generator().manual_seed(index))
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times, peak = timed_steps(step, steps)
    accelerator.free_memory()  # the caller empties the cache once this stage's model is out of scope
    return {"step_s_median": statistics.median(times), "step_s": times, "peak_allocated_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetune-config", default="configs/finetune_lora.yaml")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per stage (after 2 warm-up)")
    parser.add_argument("--path-steps", type=int, default=8, help="Euler steps per block of the timed teacher video")
    parser.add_argument("--clips", type=int, default=100, help="prepared clips the whole-command estimate is for")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    finetune = load_finetune_config(args.finetune_config)
    student_config = load_config(finetune.model_config)
    teacher_config = load_config(finetune.teacher_config or student_config.teacher)
    teacher_cfg = load_training_config(None, {**finetune.training, **finetune.teacher})
    student_cfg = load_training_config(None, {**finetune.training, **finetune.student})
    accelerator = Accelerator(mixed_precision="bf16")
    device = accelerator.device
    frames = student_config.num_blocks * student_config.frames_per_block
    h, w = student_config.latent_size()
    text = (1, student_config.model["text_len"], student_config.model["text_dim"])
    latents = torch.randn(1, 16, frames, h, w)
    prompts = torch.randn(*text) * 0.1
    fpb = student_config.frames_per_block
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "frames": 4 * frames - 3, "height": student_config.height, "width": student_config.width,
              "tokens": frames * (h // 2) * (w // 2), "lora_rank": student_cfg.lora.rank}

    objective = FlowObjective(**{k: v for k, v in vars(teacher_cfg.objective).items()})
    report["teacher"] = training_stage(
        accelerator, teacher_config, teacher_cfg.lora.rank, teacher_cfg.checkpointed_blocks,
        lambda module, rng: flow_matching_loss(module, {"latents": latents, "prompts": prompts}, objective, fpb, 0, rng,
                                               device), args.steps)
    print("teacher", json.dumps(report["teacher"]), flush=True)
    torch.cuda.empty_cache()

    sigmas = few_step_sigmas(student_config.sampler)
    trajectory = torch.randn(1, len(sigmas), 16, frames, h, w)
    report["student"] = training_stage(
        accelerator, student_config, student_cfg.lora.rank, student_cfg.checkpointed_blocks,
        lambda module, rng: ode_regression_loss(module, {"latents": latents, "prompts": prompts,
                                                         "trajectory": trajectory}, sigmas, fpb, 0, rng, device),
        args.steps)
    print("student", json.dumps(report["student"]), flush=True)
    torch.cuda.empty_cache()

    with torch.device(device):
        generator = CausalWanModel(**teacher_config.model).to(torch.bfloat16).eval()
    teacher = FlowStep(generator, fpb, teacher_config.model["text_len"]).to(device)
    guidance = finetune.paths.guidance if finetune.paths.guidance is not None else teacher_config.sampler.guidance_scale

    def video(index: int) -> None:
        with torch.autocast("cuda", torch.bfloat16):
            teacher_trajectories(teacher, latents, prompts, 0, sigmas, args.path_steps, guidance,
                                 torch.Generator().manual_seed(index), unconditional=torch.zeros(text[1:]))

    times, peak = timed_steps(video, 1)
    full_steps = finetune.paths.steps or teacher_config.sampler.num_steps
    passes = [len(euler_grid(n, sigmas)) - 1 for n in (args.path_steps, full_steps)]  # Euler steps per block
    per_video = times[0] * passes[1] / passes[0]
    report["paths"] = {"euler_steps_timed": args.path_steps, "video_s": times[0], "peak_allocated_gib": peak,
                       "euler_steps_configured": full_steps, "video_s_at_configured_steps": per_video,
                       "guidance": guidance}
    print("paths", json.dumps(report["paths"]), flush=True)

    videos = args.clips * finetune.paths.per_clip + len(finetune.preserve.prompts) * finetune.preserve.per_prompt
    estimate = {"clips": args.clips, "teacher_steps": teacher_cfg.max_steps, "teacher_videos": videos,
                "student_steps": student_cfg.max_steps,
                "teacher_s": teacher_cfg.max_steps * report["teacher"]["step_s_median"],
                "paths_s": videos * per_video,
                "student_s": student_cfg.max_steps * report["student"]["step_s_median"]}
    estimate["total_h"] = (estimate["teacher_s"] + estimate["paths_s"] + estimate["student_s"]) / 3600
    report["whole_command_estimate"] = estimate
    report["command"] = "python bench/bench_finetune.py " + " ".join(sys.argv[1:])
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
