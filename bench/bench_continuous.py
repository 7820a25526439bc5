"""Continuous generation at full size (random weights): do speed and memory stay flat over 60+ blocks?

Runs one continuous request (rolling attention window with sink frames, per-block noise) through
StreamingVideoPipeline.generate(), exactly as the app's continuous mode does, and writes the frames
to a progressive mp4 as the app does (when imageio-ffmpeg is installed). Reports, per block, the wall time, GPU peak and host memory,
and compares blocks 1-10 with blocks 51-60.

    python bench/bench_continuous.py --blocks 64 --out bench/results/h100_continuous.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_streaming import build_components  # noqa: E402

from pipelines.config import load_config  # noqa: E402
from pipelines.core import GenerationRequest, StreamingVideoPipeline  # noqa: E402

try:
    from pipelines.loading.video_io import H264Writer
except ImportError:  # a bare GPU machine without imageio-ffmpeg: generation only
    H264Writer = None

GIB = 2**30


def host_rss_gib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def summarise(rows: list[dict]) -> dict:
    frames = sum(r["frames"] for r in rows)
    return {"fps": frames / sum(r["wall_s"] for r in rows),
            "block_ms_median": statistics.median(r["wall_s"] for r in rows) * 1e3,
            "gpu_peak_gib_max": max(r["gpu_peak_gib"] for r in rows),
            "gpu_allocated_gib_max": max(r["gpu_allocated_gib"] for r in rows),
            "host_rss_gib_max": max(r["host_rss_gib"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/self_forcing_dmd.yaml")
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)

    device = torch.device("cuda")
    config = load_config(args.config)
    pipeline = StreamingVideoPipeline(build_components(config, device, config.torch_dtype), config, device)
    for _ in pipeline.generate(GenerationRequest("warm-up", num_blocks=2)):
        pass

    rows: list[dict] = []
    done = {"blocks": 0}
    request = GenerationRequest("A red kite flying over green hills on a windy afternoon", seed=1, continuous=True)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "continuous.mp4"
        writer = H264Writer(path, config.width, config.height, config.fps) if H264Writer else None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        last = time.perf_counter()
        frames, denoise_s, decode_s = 0, 0.0, 0.0
        for result in pipeline.generate(request, cancel=lambda: done["blocks"] >= args.blocks):
            if writer is not None:
                writer.write(result.frames)
            frames += result.frames.shape[0]
            denoise_s, decode_s = denoise_s + result.denoise_s, decode_s + result.decode_s
            if not result.complete:
                continue
            now = time.perf_counter()
            rows.append({"block": result.index + 1, "wall_s": now - last, "frames": frames,
                         "denoise_ms": denoise_s * 1e3, "decode_ms": decode_s * 1e3,
                         "gpu_peak_gib": torch.cuda.max_memory_allocated() / GIB,
                         "gpu_allocated_gib": torch.cuda.memory_allocated() / GIB,
                         "host_rss_gib": host_rss_gib(), "window_frames": result.window_frames})
            torch.cuda.reset_peak_memory_stats()
            last, frames, denoise_s, decode_s = now, 0, 0.0, 0.0
            done["blocks"] += 1
        if writer is not None:
            writer.close()
        mp4_mb = path.stat().st_size / 1e6 if writer is not None else None

    early, late = summarise(rows[:10]), summarise(rows[50:60])
    report = {"device": torch.cuda.get_device_name(), "command": " ".join(["python"] + sys.argv),
              "config": config.name, "blocks": len(rows), "window_frames": rows[-1]["window_frames"],
              "mp4_mb": mp4_mb, "blocks_1_10": early, "blocks_51_60": late,
              "fps_ratio_late_vs_early": late["fps"] / early["fps"], "per_block": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "per_block"}, indent=2))


if __name__ == "__main__":
    main()
