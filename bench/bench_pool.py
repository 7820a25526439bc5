"""GPU benchmark of the worker pool: N concurrent clients against a Ray Serve pool of N workers, each worker a full
Wan2.1-T2V-1.3B-sized pipeline with random weights (speed does not depend on weight values), eager, 81 frames at
832x480, every block H.264-encoded on the worker and shipped to the front end exactly as the app does.

Several workers on one GPU take fractions of it (--gpus-per-worker 1/N). Per stream: time from the request to
its first frames at the front end and the worker's FPS; per pool: aggregate frames per second.

    python bench/bench_pool.py --workers 1 2 4 --runs 2 --out bench/results/h200_pool.json
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.metrics import percentile  # noqa: E402
from pipelines.config import CONFIG_DIR, load_config  # noqa: E402
from pipelines.steering import PromptSteering  # noqa: E402
from serving.engine import Engine  # noqa: E402
from serving.jobs import Block, StreamJob  # noqa: E402

PROMPT = "A corgi runs along a beach at sunset, waves rolling in, cinematic lighting"


def random_engine(config_path: str) -> Engine:
    """A worker's engine: full-size random weights built on its GPU (bench_streaming's components)."""
    import torch

    from bench.bench_streaming import build_components
    from pipelines.core import StreamingVideoPipeline

    config = load_config(config_path)
    device = torch.device("cuda")
    pipeline = StreamingVideoPipeline(build_components(config, device, config.torch_dtype), config, device)
    return Engine(config=config, device=str(device), pipeline=pipeline)


def one_stream(backend, seed: int) -> dict:
    sent = time.perf_counter()
    first, server_first, frames, last = None, None, 0, None
    for event in backend.stream(StreamJob(prompt=f"{PROMPT} ({seed})", seed=seed), lambda: False, PromptSteering()):
        if isinstance(event, Block):
            if first is None:
                first, server_first = time.perf_counter(), event.elapsed_s
            frames += event.frames
            last = event
    return {"first_frames_s": first - sent, "server_first_frames_s": server_first, "frames": frames,
            "worker_fps": frames / last.elapsed_s, "end": time.perf_counter(), "sent": sent}


def round_of(backend, clients: int, runs: int, seed: int) -> list[dict]:
    """`clients` threads, each running `runs` streams one after the other."""
    results: list[dict] = []

    def client(index: int) -> None:
        for run in range(runs):
            results.append(one_stream(backend, seed + 100 * index + run))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def measure(workers: int, runs: int, config_path: str) -> dict:
    import bench.bench_pool as this  # (the workers unpickle the factory by reference)
    from serving.pool.client import PoolBackend, PoolOptions

    started = time.perf_counter()
    backend = PoolBackend(functools.partial(this.random_engine, config_path),
                          PoolOptions(workers=workers, gpus_per_worker=1.0 / workers, cpus_per_worker=2))
    start_s = time.perf_counter() - started
    try:
        round_of(backend, workers, 1, seed=0)  # warm-up: one stream per worker
        began = time.perf_counter()
        streams = round_of(backend, workers, runs, seed=1000)
        wall = max(s["end"] for s in streams) - began
    finally:
        backend.shutdown()
    first = [s["first_frames_s"] for s in streams]
    server_first = [s["server_first_frames_s"] for s in streams]
    fps = [s["worker_fps"] for s in streams]
    return {"workers": workers, "gpus_per_worker": 1.0 / workers, "clients": workers, "streams": len(streams),
            "pool_start_s": round(start_s, 1),
            "first_frames_s": {"p50": percentile(first, 50), "p95": percentile(first, 95)},
            "worker_first_frames_s": {"p50": percentile(server_first, 50), "p95": percentile(server_first, 95)},
            "per_stream_fps": {"median": statistics.median(fps), "min": min(fps), "max": max(fps)},
            "aggregate_fps": sum(s["frames"] for s in streams) / wall, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=2, help="timed streams per client")
    parser.add_argument("--config", default=str(CONFIG_DIR / "self_forcing_dmd.yaml"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    report = {"command": "python bench/bench_pool.py " + " ".join(sys.argv[1:]),
              "gpu": torch.cuda.get_device_name(0), "frames_per_stream": 81, "size": "832x480",
              "weights": "random, full Wan2.1-T2V-1.3B size, eager bf16", "results": []}
    for workers in args.workers:
        report["results"].append(measure(workers, args.runs, args.config))
        print(json.dumps(report["results"][-1]), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
