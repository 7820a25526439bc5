"""Peak GPU memory and speed of each memory profile at full size (random weights), 81 frames 832x480.

Small cards are emulated with torch.cuda.set_per_process_memory_fraction. Every run includes
text encoding with a UMT5-XXL-sized encoder and the streaming VAE decode. The low profile is
also run 20 times in a row to check that reserved memory does not grow.

    python bench/bench_memory.py --out bench/results/h100_memory.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_streaming import PROMPTS, build_components, time_generation  # noqa: E402

from pipelines.config import load_config  # noqa: E402
from pipelines.core import GenerationRequest, StreamingVideoPipeline  # noqa: E402
from pipelines.memory import GIB, configure_memory  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/self_forcing_dmd.yaml")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--card-gib", type=float, nargs="+", default=[8.0, 6.0], help="emulated card sizes for low")
    parser.add_argument("--repeat", type=int, default=20, help="consecutive low-profile runs for the leak check")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)

    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    config = load_config(args.config)
    pipeline = StreamingVideoPipeline(build_components(config, device, config.torch_dtype), config, device)
    report: dict = {"device": torch.cuda.get_device_name(), "command": " ".join(["python"] + sys.argv),
                    "profiles": {}}
    time_generation(pipeline, "warm-up", seed=0)
    for name in ("high", "medium"):
        plan = configure_memory(pipeline, name, total)
        report["profiles"][name] = {"plan": plan.summary(), **measure(pipeline, args.runs)}
        logging.info("%s: %s", name, report["profiles"][name])
    for card in args.card_gib:
        configure_memory(pipeline, "low", total)  # weights off the GPU before the cap applies
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(card * GIB / total, torch.cuda.current_device())
        plan = configure_memory(pipeline, "low", int(card * GIB))
        key = f"low@{card:g}GiB"
        try:
            measured = measure(pipeline, args.runs)
            if card == args.card_gib[0]:
                measured["repeat_reserved_gib"] = repeat_runs(pipeline, args.repeat)
        except torch.cuda.OutOfMemoryError as err:
            measured = {"fps_median": 0.0, "first_frames_s_median": 0.0, "peak_allocated_gib": card,
                        "frames": 0, "oom": str(err).splitlines()[0][:300]}
        report["profiles"][key] = {"plan": plan.summary(), "window_frames": plan.window_frames, **measured}
        logging.info("%s: %s", key, report["profiles"][key])
    high = report["profiles"]["high"]["fps_median"]
    for name, row in report["profiles"].items():
        row["fps_vs_high"] = row["fps_median"] / high
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    for name, row in report["profiles"].items():
        print(f"{name:12s} peak={row['peak_allocated_gib']:.2f}GiB fps={row['fps_median']:.1f} "
              f"({row['fps_vs_high']:.0%} of high) first={row['first_frames_s_median']:.2f}s")
    reserved = report["profiles"][f"low@{args.card_gib[0]:g}GiB"].get("repeat_reserved_gib")
    if reserved:
        print(f"reserved after each of {args.repeat} low runs: min {min(reserved):.2f} max {max(reserved):.2f} GiB")


if __name__ == "__main__":
    main()
