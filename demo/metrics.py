"""Run metrics: one JSON line per generation in the outputs folder, the Stats panel's summary, and
Prometheus series for operators of a hosted demo (served at /metrics)."""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)


@dataclass
class RunRecord:
    """What one generation did; fields the run did not reach stay None."""

    tab: str
    model: str
    profile: str | None
    device: str
    resolution: str
    blocks: int
    time: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    blocks_done: int = 0
    server_first_frame_s: float | None = None
    browser_first_frame_s: float | None = None
    fps: float | None = None
    ms_per_block: float | None = None
    peak_gpu_bytes: int | None = None
    cancelled: bool = False
    failed: str | None = None
    worker: str | None = None  # who ran it ("local", or a pool worker's id)
    queue_wait_s: float | None = None  # from the request to its start on a worker
    busy_s: float | None = None  # from its start to its end (the worker's busy time)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


class RunMetrics:
    """The metrics log file and the Prometheus series of one server (thread-safe)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.generations = Counter("sf_generations", "Generations finished (including stopped ones)", ["tab"],
                                   registry=self.registry)
        self.failures = Counter("sf_generation_failures", "Generations that ended with an error", ["tab"],
                                registry=self.registry)
        self.first_frame = Histogram("sf_time_to_first_frame_seconds", "Server-side time to the first decoded frame",
                                     buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=self.registry)
        self.browser_first_frame = Histogram(
            "sf_browser_time_to_first_frame_seconds", "Click to first frame on screen, as the browser measured it",
            buckets=(0.25, 0.5, 1, 2, 5, 10, 30), registry=self.registry)
        self.fps = Histogram("sf_frames_per_second", "Frames per second of finished generations",
                             buckets=(1, 2, 5, 10, 15, 20, 25, 30, 45, 60), registry=self.registry)
        self.queue = Gauge("sf_queue_length", "Requests waiting for the GPU", registry=self.registry)
        self.queue_wait = Histogram("sf_queue_wait_seconds", "From a request to its start on a worker",
                                    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300), registry=self.registry)
        self.worker_busy = Counter("sf_worker_busy_seconds", "Seconds each worker spent running streams", ["worker"],
                                   registry=self.registry)
        self.worker_restarts = Counter("sf_worker_restarts", "Pool workers lost mid-run (killed or stalled) and "
                                       "replaced by Ray Serve", registry=self.registry)
        self.workers = Gauge("sf_live_workers", "Pool workers ready to run a stream", registry=self.registry)

    def watch_queue(self, queue_length: Callable[[], int], live_workers: Callable[[], int]) -> None:
        """The queue and worker gauges read the functions whenever they are scraped."""
        self.queue.set_function(queue_length)
        self.workers.set_function(live_workers)

    def record(self, run: RunRecord) -> None:
        self.generations.labels(run.tab).inc()
        if run.failed:
            self.failures.labels(run.tab).inc()
        if run.server_first_frame_s is not None:
            self.first_frame.observe(run.server_first_frame_s)
        if run.fps is not None and not run.cancelled and not run.failed:
            self.fps.observe(run.fps)
        if run.queue_wait_s is not None:
            self.queue_wait.observe(run.queue_wait_s)
        if run.busy_s is not None and run.worker is not None:
            self.worker_busy.labels(run.worker).inc(run.busy_s)
        if run.failed == "worker lost":
            self.worker_restarts.inc()
        if self.path is not None:
            with self._lock, self.path.open("a", encoding="utf-8") as log_file:
                log_file.write(json.dumps(asdict(run)) + "\n")

    def record_browser_first_frame(self, seconds: float) -> None:
        self.browser_first_frame.observe(seconds)

    def recent(self, count: int = 200) -> list[dict]:
        if self.path is None or not self.path.is_file():
            return []
        with self._lock:
            lines = self.path.read_text(encoding="utf-8").splitlines()[-count:]
        runs = []
        for line in lines:
            try:
                runs.append(json.loads(line))
            except ValueError:  # a line cut short by a crash: skip it
                continue
        return runs

    def summary_markdown(self, rows: int = 10) -> str:
        runs = self.recent()
        if not runs:
            return "No generations yet."
        done = [r for r in runs if not r.get("failed") and not r.get("cancelled")]
        lines = [f"**{len(runs)} recent runs** ({len(runs) - len(done)} stopped or failed)", "",
                 "| metric | p50 | p95 |", "| --- | --- | --- |"]
        for key, label, unit in (("queue_wait_s", "queue wait", "s"), ("server_first_frame_s", "first frame (server)", "s"),
                                 ("browser_first_frame_s", "first frame on screen (browser)", "s"),
                                 ("fps", "FPS", ""), ("ms_per_block", "ms per block", "")):
            values = [r[key] for r in done if r.get(key) is not None]
            p50, p95 = percentile(values, 50), percentile(values, 95)
            lines.append(f"| {label} | {_fmt(p50, unit)} | {_fmt(p95, unit)} |")
        lines += self._worker_rows(runs)
        lines += ["", "| time | tab | resolution | blocks | first frame | FPS | state |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in reversed(runs[-rows:]):
            state = "failed" if r.get("failed") else "stopped" if r.get("cancelled") else "done"
            lines.append(f"| {r['time']} | {r['tab']} | {r['resolution']} | {r['blocks_done']}/{r['blocks']} | "
                         f"{_fmt(r.get('server_first_frame_s'), 's')} | {_fmt(r.get('fps'), '')} | {state} |")
        return "\n".join(lines)


    @staticmethod
    def _worker_rows(runs: list[dict]) -> list[str]:
        """Busy time, runs and losses per worker (pool mode: several workers share the log)."""
        workers: dict[str, list] = {}
        for r in runs:
            if r.get("worker"):
                entry = workers.setdefault(r["worker"], [0.0, 0, 0])
                entry[0] += r.get("busy_s") or 0.0
                entry[1] += 1
                entry[2] += r.get("failed") == "worker lost"
        if len(workers) < 2 and not any(lost for _, _, lost in workers.values()):
            return []
        rows = ["", "| worker | busy | runs | lost mid-run |", "| --- | --- | --- | --- |"]
        rows += [f"| {name} | {busy:.0f} s | {count} | {lost} |" for name, (busy, count, lost) in sorted(workers.items())]
        return rows


def _fmt(value: float | None, unit: str) -> str:
    return "–" if value is None else f"{value:.2f}{' ' + unit if unit else ''}"
