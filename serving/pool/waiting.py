"""The pool's queue as the front end sees it: who waits (in order), who runs (and how far), and how long a
waiting visitor should expect to wait, from measured run times."""
from __future__ import annotations

import heapq
import itertools
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass

from ..jobs import Block, Started, Waiting


def estimate_wait(position: int, workers: int, remaining_s: list[float], typical_run_s: float | None) -> float | None:
    """Seconds until the request at `position` (1 = next) starts: the workers free up after the running streams'
    remaining times (a worker without a stream is free now), and each request ahead takes one of them for a
    typical run. None when that cannot be said (no worker, or requests ahead and no run measured yet)."""
    if workers < 1:
        return None
    free_at = sorted(remaining_s)[:workers] + [0.0] * max(0, workers - len(remaining_s))
    heapq.heapify(free_at)
    for _ in range(position - 1):
        if typical_run_s is None:
            return None
        heapq.heappush(free_at, heapq.heappop(free_at) + typical_run_s)
    return heapq.heappop(free_at)


@dataclass
class Progress:
    started: float
    num_blocks: int
    continuous: bool
    blocks_done: int = 0

    def remaining_s(self, now: float, typical_run_s: float | None) -> float | None:
        elapsed = now - self.started
        if self.blocks_done and not self.continuous:
            return elapsed / self.blocks_done * (self.num_blocks - self.blocks_done)
        return max(0.0, typical_run_s - elapsed) if typical_run_s is not None else None


class PoolQueue:
    """Thread-safe: every visitor's handler thread joins, starts and leaves it."""

    RECENT_RUNS = 20

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tickets = itertools.count(1)
        self._waiting: list[int] = []
        self._running: dict[int, Progress] = {}
        self._durations: deque[float] = deque(maxlen=self.RECENT_RUNS)

    def join(self) -> int:
        with self._lock:
            ticket = next(self._tickets)
            self._waiting.append(ticket)
            return ticket

    def start(self, ticket: int, started: Started, continuous: bool) -> None:
        with self._lock:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
            self._running[ticket] = Progress(time.monotonic(), started.num_blocks, continuous)

    def progress(self, ticket: int, block: Block) -> None:
        with self._lock:
            if block.complete and ticket in self._running:
                self._running[ticket].blocks_done += 1

    def leave(self, ticket: int) -> None:
        """The request ended (done, stopped, failed or dropped); a finished run's time joins the measurements."""
        with self._lock:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
            progress = self._running.pop(ticket, None)
            if progress is not None and progress.blocks_done == progress.num_blocks and not progress.continuous:
                self._durations.append(time.monotonic() - progress.started)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def typical_run_s(self) -> float | None:
        return statistics.median(self._durations) if self._durations else None

    def status(self, ticket: int, workers: int) -> Waiting:
        with self._lock:
            position = self._waiting.index(ticket) + 1 if ticket in self._waiting else 1
            typical = self.typical_run_s()
            now = time.monotonic()
            remaining = [r for p in self._running.values() if (r := p.remaining_s(now, typical)) is not None]
            unknown = len(self._running) - len(remaining)
            waiting = len(self._waiting)
        estimate = None if unknown else estimate_wait(position, workers, remaining, typical)
        return Waiting(position, waiting, workers, estimate)
