"""The drift guard's remedy, measured on the embedded tiny model (CPU): continuous runs of 120 blocks with the guard
off and with each way of re-caching, the guard's threshold low enough to act often (0.1; the tiny model does not
degrade as a large one does, so its drift score mostly follows content, the shape leaving and re-entering).

    python bench/bench_drift_guard.py --out bench/results/cpu_drift_guard.json

Per run: the mean drift score after block 20, its maximum, how often the guard re-cached, and the mean absolute
pixel step across a re-cache against the step between other blocks (a visible jump when the first is larger).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipelines.core as core  # noqa: E402
from bench.report import write_report  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.core import GenerationRequest, StreamingVideoPipeline  # noqa: E402
from pipelines.loading.weights import load_components  # noqa: E402

PROMPT = "a red circle moves to the right on a dark blue background"
# What the re-cache keeps besides the sink frames: nothing, the last block (shipped), every cached block (LongLive's
# recache under the same prompt).
VARIANTS = {"off": None, "sink frames only": 0, "sink frames + last block": 1, "every cached block": 10**6}


def run(pipeline: StreamingVideoPipeline, seed: int, blocks: int, guard: float | None) -> dict:
    done, scores, refreshed, jumps, steps, last = 0, [], 0, [], [], None
    request = GenerationRequest(PROMPT, seed=seed, continuous=True, drift_guard=guard)
    for result in pipeline.generate(request, cancel=lambda: done >= blocks):
        if result.complete:
            done += 1
            scores.append(result.drift.score)
            refreshed += result.refreshed
            if last is not None:
                (jumps if result.refreshed else steps).append(float(np.abs(result.frames[0].astype(float) - last).mean()))
        last = result.frames[-1].astype(float)
    return {"mean_drift_after_20": round(statistics.mean(scores[20:]), 4), "max_drift": round(max(scores), 3),
            "recaches": refreshed, "step_at_recache": round(statistics.mean(jumps), 2) if jumps else None,
            "step_between_blocks": round(statistics.mean(steps), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=120)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    config = load_config("configs/tiny.yaml")
    pipeline = StreamingVideoPipeline(load_components(config), config)
    results = {}
    for name, keep in VARIANTS.items():
        if keep is not None:
            core.REFRESH_RECENT_BLOCKS = keep
        runs = {seed: run(pipeline, seed, args.blocks, None if keep is None else args.threshold) for seed in args.seeds}
        results[name] = {"mean_drift_after_20": round(statistics.mean(r["mean_drift_after_20"] for r in runs.values()), 4),
                         "runs": runs}
        print(name, results[name], flush=True)
    report = {"command": "python " + " ".join(["bench/bench_drift_guard.py", *(argv or sys.argv[1:])]),
              "model": config.name, "device": "cpu", "blocks": args.blocks, "threshold": args.threshold,
              "results": results}
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
