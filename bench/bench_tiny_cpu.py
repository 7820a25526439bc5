"""CPU speed of a tiny config through the app's pipeline: ms per streamed block (denoise + decode),
frames per second and time to the first block, at the config's default size.

    python bench/bench_tiny_cpu.py --config configs/tiny.yaml [--weights DIR] [--runs 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipelines.builder import build_pipeline  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.core import GenerationRequest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--weights", help="weights folder (default: the config's own)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.config)
    pipeline, _ = build_pipeline(config, args.weights, "cpu")
    per_block, first, fps = [], [], []
    for run in range(args.runs + 1):  # run 0 warms up
        request = GenerationRequest(f"a red circle moves to the right on a dark blue background {run}", seed=run,
                                    num_blocks=args.blocks)
        started = last = time.perf_counter()
        times, frames = [], 0
        for result in pipeline.generate(request):
            now = time.perf_counter()
            times.append(now - last)
            last, frames = now, frames + len(result.frames)
        if run:
            first.append(times[0])
            per_block.extend(times)
            fps.append(frames / (last - started))
    print(json.dumps({
        "config": args.config, "size": f"{config.width}x{config.height}", "blocks": args.blocks, "runs": args.runs,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ms_per_block_median": round(statistics.median(per_block) * 1e3, 1),
        "ms_per_block_max": round(max(per_block) * 1e3, 1),
        "first_block_s_median": round(statistics.median(first), 3),
        "fps_median": round(statistics.median(fps), 1)}, indent=2))


if __name__ == "__main__":
    main()
