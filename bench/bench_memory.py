"""Peak GPU memory and speed of the memory plans at full size (random weights), 81 frames 832x480.

Small cards are emulated with torch.cuda.set_per_process_memory_fraction; each capped run uses the
plan that "auto" picks for that card (profile, frame-by-frame VAE decode, FP8 KV cache, resident
blocks, window). Every run includes text encoding with a UMT5-XXL-sized encoder and the streaming
VAE decode. The 8 GiB plan is also run 20 times in a row to check that reserved memory stays flat.
Also reported: how far the FP8 KV cache moves the output from the bf16 cache (same seeds), and the
VAE decode working set whole vs frame by frame (calibrates the planner).

    python bench/bench_memory.py --out bench/results/h100_memory_plans.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_streaming import PROMPTS, build_components, time_generation  # noqa: E402

from pipelines.config import load_config  # noqa: E402
from pipelines.core import GenerationRequest, StreamingVideoPipeline  # noqa: E402
from pipelines.loading.vae import frames_psnr  # noqa: E402
from pipelines.memory.planner import GIB, configure_memory  # noqa: E402


def measure(pipeline: StreamingVideoPipeline, runs: int) -> dict:
    results = [time_generation(pipeline, PROMPTS[i % len(PROMPTS)] + f" #{i}", seed=i) for i in range(runs)]
    return {"fps_median": statistics.median(r["fps"] for r in results),
            "first_frames_s_median": statistics.median(r["first_frames_s"] for r in results),
            "peak_allocated_gib": max(r["peak_allocated_gib"] for r in results),
            "frames": results[0]["frames"]}


def repeat_runs(pipeline: StreamingVideoPipeline, repeat: int) -> list[float]:
    """Reserved memory after each of `repeat` back-to-back generations (fragmentation check)."""
    reserved = []
    for i in range(repeat):
        for _ in pipeline.generate(GenerationRequest(f"repeat {i}", seed=i, num_blocks=2)):
            pass
        reserved.append(torch.cuda.memory_reserved() / GIB)
    return reserved


def fidelity(pipeline: StreamingVideoPipeline, seeds: list[int]) -> dict:
    """FP8 vs bf16 KV cache on the same requests: latent relative error and PSNR of the decoded frames."""
    def run(fp8: bool, seed: int):
        settings = dataclasses.replace(pipeline.settings, kv_cache_fp8=fp8)
        results = list(pipeline.with_settings(settings).generate(GenerationRequest(PROMPTS[seed % len(PROMPTS)], seed=seed)))
        latents = torch.cat([r.latents for r in results if r.complete], dim=2)
        return latents, np.concatenate([r.frames for r in results])

    rows = []
    for seed in seeds:
        (want_latents, want_frames), (got_latents, got_frames) = run(False, seed), run(True, seed)
        rows.append({"seed": seed,
                     "latent_relative_error": float((got_latents - want_latents).norm() / want_latents.norm()),
                     "psnr_db": frames_psnr(got_frames, want_frames)})
    return {"runs": rows, "latent_relative_error_mean": statistics.mean(r["latent_relative_error"] for r in rows),
            "psnr_db_mean": statistics.mean(r["psnr_db"] for r in rows)}


def decode_working_set(pipeline: StreamingVideoPipeline) -> dict:
    """Peak memory above the resting state while the streaming decoder decodes 7 latent frames."""
    cfg = pipeline.config
    latents = torch.randn(1, 16, 7, *cfg.latent_size(), device="cuda", dtype=pipeline.dtype)
    report = {}
    for frame_by_frame in (False, True):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        decoder = pipeline.vae.stream(frame_by_frame)
        for first in range(0, 7, 3):
            decoder.decode_block(latents[:, :, first:first + 3])
        torch.cuda.synchronize()
        report["frame_by_frame" if frame_by_frame else "whole"] = {
            "peak_gib": (torch.cuda.max_memory_allocated() - base) / GIB,
            "ms_per_latent_frame": (time.perf_counter() - start) * 1e3 / 7}
        del decoder
    report["share"] = report["frame_by_frame"]["peak_gib"] / report["whole"]["peak_gib"]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/self_forcing_dmd.yaml")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--card-gib", type=float, nargs="+", default=[12.0, 8.0, 6.0], help="emulated card sizes")
    parser.add_argument("--repeat", type=int, default=20, help="consecutive runs on the 8 GiB plan (leak check)")
    parser.add_argument("--fidelity-seeds", type=int, default=2, help="videos compared for FP8 vs bf16 KV cache")
    parser.add_argument("--uncapped-too", action="store_true",
                        help="also run each card's plan without the memory cap (separates the cap's own cost)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)

    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    config = load_config(args.config)
    components = build_components(config, device, config.torch_dtype)
    pipeline = StreamingVideoPipeline(components, config, device)
    report: dict = {"device": torch.cuda.get_device_name(), "command": " ".join(["python"] + sys.argv),
                    "profiles": {}}
    time_generation(pipeline, "warm-up", seed=0)
    report["decode_working_set"] = decode_working_set(pipeline)
    logging.info("decode: %s", report["decode_working_set"])
    report["fp8_kv_cache_vs_bf16"] = fidelity(pipeline, list(range(args.fidelity_seeds)))
    logging.info("fp8 fidelity: %s", report["fp8_kv_cache_vs_bf16"])
    for name in ("high", "medium"):
        plan, settings = configure_memory(components, config, device, name, total)
        pipeline = pipeline.with_settings(settings)
        report["profiles"][name] = {"plan": plan.summary(), **measure(pipeline, args.runs)}
        logging.info("%s: %s", name, report["profiles"][name])
    for card in args.card_gib:
        configure_memory(components, config, device, "low", total)  # weights off the GPU before the cap applies
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(card * GIB / total, torch.cuda.current_device())
        plan, settings = configure_memory(components, config, device, "auto", int(card * GIB))
        pipeline = pipeline.with_settings(settings)
        key = f"auto@{card:g}GiB"
        try:
            measured = measure(pipeline, args.runs)
            if card == 8.0:
                measured["repeat_reserved_gib"] = repeat_runs(pipeline, args.repeat)
        except torch.cuda.OutOfMemoryError as err:
            measured = {"fps_median": 0.0, "first_frames_s_median": 0.0, "peak_allocated_gib": card,
                        "frames": 0, "oom": str(err).splitlines()[0][:300]}
        torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
        if args.uncapped_too and "oom" not in measured:
            measured["uncapped"] = measure(pipeline, args.runs)
        report["profiles"][key] = {"plan": plan.summary(), "window_frames": plan.window_frames,
                                   "kv_fp8": plan.kv_fp8, "decode_frame_by_frame": plan.decode_frame_by_frame,
                                   "resident_blocks": plan.resident_blocks,
                                   "estimated_peak_gib": plan.estimated_peak_bytes / GIB, **measured}
        logging.info("%s: %s", key, report["profiles"][key])
    high = report["profiles"]["high"]["fps_median"]
    for name, row in report["profiles"].items():
        row["fps_vs_high"] = row["fps_median"] / high
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    for name, row in report["profiles"].items():
        print(f"{name:12s} peak={row['peak_allocated_gib']:.2f}GiB fps={row['fps_median']:.1f} "
              f"({row['fps_vs_high']:.0%} of high) first={row['first_frames_s_median']:.2f}s"
              + (f" uncapped fps={row['uncapped']['fps_median']:.1f}" if "uncapped" in row else ""))
    reserved = report["profiles"].get("auto@8GiB", {}).get("repeat_reserved_gib")
    if reserved:
        print(f"reserved after each of {args.repeat} runs at 8 GiB: min {min(reserved):.2f} max {max(reserved):.2f} GiB")
    print("fp8 vs bf16:", json.dumps(report["fp8_kv_cache_vs_bf16"]))
    print("decode:", json.dumps(report["decode_working_set"]))


if __name__ == "__main__":
    main()
