"""GPU benchmark of one LoRA training step at full Wan2.1-T2V-1.3B size with random weights.

Batch 1, 81 frames at 832x480 (21 latent frames, 32760 tokens), LoRA rank 32 on the default
targets, gradient checkpointing, bf16 through accelerate: exactly the trainer's step
(training.train.FlowStep + flow_matching_loss + AdamW), on random latents and prompt embeddings.

    python bench/bench_training.py --steps 6 --out bench/results/h100_training_step.json
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
from training.objective import FlowObjective  # noqa: E402
from training.train import FlowStep, flow_matching_loss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/self_forcing_dmd.yaml")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--checkpointed-blocks", type=int, help="recompute only the first N blocks (default: all)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    config = load_config(args.config)
    accelerator = Accelerator(mixed_precision="bf16")
    device = accelerator.device
    with torch.device(device):
        generator = CausalWanModel(**config.model).to(torch.bfloat16)
    generator.gradient_checkpointing = not args.no_checkpointing
    generator.checkpointed_blocks = args.checkpointed_blocks
    params = add_lora(generator, args.rank, args.rank)
    step_module = FlowStep(generator, config.frames_per_block, config.model["text_len"]).to(device)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    step_module, optimizer = accelerator.prepare(step_module, optimizer)
    latent_frames = config.num_blocks * config.frames_per_block
    h, w = config.height // 8, config.width // 8
    batch = {"latents": torch.randn(1, 16, latent_frames, h, w),
             "prompts": torch.randn(1, config.model["text_len"], config.model["text_dim"]) * 0.1}
    objective = FlowObjective()
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = flow_matching_loss(step_module, batch, objective, config.frames_per_block, 0,
                                  torch.Generator().manual_seed(step), device)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if step >= 2:
            times.append(elapsed)
        print(f"step {step}: {elapsed:.3f} s, loss {loss.item():.4f}", flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": args.config,
              "frames": 4 * latent_frames - 3, "height": config.height, "width": config.width,
              "tokens": latent_frames * (h // 2) * (w // 2), "lora_rank": args.rank,
              "gradient_checkpointing": not args.no_checkpointing, "checkpointed_blocks": args.checkpointed_blocks, "trainable_params": sum(p.numel() for p in params),
              "step_s_median": statistics.median(times), "step_s": times,
              "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
              "command": "python bench/bench_training.py " + " ".join(sys.argv[1:])}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
