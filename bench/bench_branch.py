"""GPU benchmark of branching at full Wan2.1-T2V-1.3B size (random weights, eager, bf16, 832x480, 7 blocks = 81
frames, full Wan VAE): what keeping a branch point costs per block, how long "branch here" takes until the branch's
first new frames (the app's path: the engine restores, re-encodes the kept blocks into the branch's mp4, then
generates), and the alternative that was not chosen, keeping KV-cache snapshots on the CPU.

    python bench/bench_branch.py --out bench/results/h200_branch.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_streaming import build_components  # noqa: E402
from bench.report import write_report  # noqa: E402
from pipelines.branch import Branch, KeptBlock  # noqa: E402
from pipelines.config import CONFIG_DIR, load_config  # noqa: E402
from pipelines.core import GenerationRequest, StreamingVideoPipeline  # noqa: E402
from pipelines.model.kv_cache import kv_bytes_per_frame  # noqa: E402
from pipelines.steering import PromptSteering  # noqa: E402
from serving.engine import Engine  # noqa: E402
from serving.jobs import Block, StreamJob  # noqa: E402

PROMPT = "A corgi runs along a beach at sunset, waves rolling in, cinematic lighting"
OTHER = "A red fox trots through fresh snow in a pine forest, soft morning light"


def timed(fn, repeats: int = 20) -> float:
    """Median milliseconds of fn() (GPU work waited for)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def first_new_frames(engine: Engine, job: StreamJob) -> dict:
    """Seconds from the job's start to its first generated (not restored) block at the front end, and to its end."""
    start = time.perf_counter()
    first = restored = None
    for event in engine.run(job, lambda: False, PromptSteering()):
        if isinstance(event, Block):
            if event.restored:
                restored = time.perf_counter() - start
            elif first is None:
                first = time.perf_counter() - start
    return {"first_new_frames_s": round(first, 3), "restored_s": None if restored is None else round(restored, 3),
            "total_s": round(time.perf_counter() - start, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG_DIR / "self_forcing_dmd.yaml"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    config = load_config(args.config)
    device = torch.device("cuda")
    pipeline = StreamingVideoPipeline(build_components(config, device, config.torch_dtype), config, device)
    engine = Engine(config=config, device="cuda", pipeline=pipeline)
    base = GenerationRequest(PROMPT, seed=1, num_blocks=config.num_blocks)
    list(pipeline.generate(GenerationRequest(PROMPT, seed=0, num_blocks=2)))  # warm-up

    results = [r for r in pipeline.generate(base) if r.complete]
    kept = tuple(KeptBlock(r.prompt, r.switch_mode, r.reseed, r.latents, r.rng_state) for r in results)
    clean = results[0].latents.to(device, pipeline.dtype)
    rng = torch.Generator(device=device).manual_seed(0)
    per_block = {"latents_mb": round(clean.float().numel() * 4 / 2**20, 2), "rng_state_bytes": rng.get_state().numel(),
                 "keep_ms": round(timed(lambda: (clean.float().cpu(), rng.get_state())), 2)}

    # The alternative: a snapshot of each block's keys and values, copied to pinned CPU memory, and back.
    model = pipeline.generator
    latent_h, latent_w = config.latent_size(config.height, config.width)
    frame_tokens = model.frame_tokens(latent_h, latent_w)
    block_bytes = kv_bytes_per_frame(model.config.num_layers, model.config.dim, frame_tokens, pipeline.dtype) * \
        config.frames_per_block
    on_gpu = torch.empty(block_bytes // 2, dtype=pipeline.dtype, device=device)
    pinned = torch.empty_like(on_gpu, device="cpu").pin_memory()
    kv_snapshot = {"mb_per_block": round(block_bytes / 2**20, 1),
                   "to_cpu_ms_per_block": round(timed(lambda: pinned.copy_(on_gpu)), 2),
                   "to_gpu_ms_per_block": round(timed(lambda: on_gpu.copy_(pinned)), 2)}

    job = StreamJob(prompt=PROMPT, seed=1, num_blocks=config.num_blocks)
    fresh = [first_new_frames(engine, job) for _ in range(2)][-1]
    branches = {}
    for block in range(1, config.num_blocks):  # (branch from block 2 .. the last, 1-based)
        runs = [first_new_frames(engine, StreamJob(prompt=PROMPT, seed=1, num_blocks=config.num_blocks,
                                                   branch=Branch(kept[:block], prompt=OTHER))) for _ in range(2)]
        branches[f"block {block + 1}"] = runs[-1]
        print(block + 1, runs[-1], flush=True)
    report = {
        "command": "python bench/bench_branch.py --out " + str(args.out),
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "config": config.name,
        "resolution": f"{config.width}x{config.height}", "blocks": config.num_blocks, "mode": "eager bf16, full VAE",
        "keep_per_block": per_block, "kv_snapshot_alternative": kv_snapshot, "fresh_run": fresh,
        "branch_from": branches}
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
