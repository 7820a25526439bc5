"""The pool's control board: Stop and new prompts from the front end, picked up by the worker running that stream.

A Ray Serve handle routes each call to any replica, so messages for one running stream go through this small
Ray actor instead, keyed by the stream's id; the worker long-polls it while the stream runs.
"""
from __future__ import annotations

import asyncio
import time

import ray

FORGET_AFTER_S = 3600  # messages for a stream nobody picked up (it never started) go after this
MAX_WAITING_FRAMES = 32  # camera frames kept for a stream whose worker has not taken them (2 s at 16 fps)


@ray.remote(num_cpus=0)
class StreamBoard:
    def __init__(self) -> None:
        self._inbox: dict[str, list[tuple]] = {}
        self._posted: dict[str, float] = {}
        self._signals: dict[str, asyncio.Event] = {}

    def _signal(self, run_id: str) -> asyncio.Event:
        return self._signals.setdefault(run_id, asyncio.Event())

    async def post(self, run_id: str, message: tuple) -> None:
        """('stop',), ('steer', prompt, mode), ('frame', image) or ('frames_end',) for the stream run_id. Only the
        latest MAX_WAITING_FRAMES frames wait: a stream still queued does not pile up its camera's frames."""
        inbox = self._inbox.setdefault(run_id, [])
        inbox.append(message)
        if message[0] == "frame":
            frames = [index for index, queued in enumerate(inbox) if queued[0] == "frame"]
            for index in reversed(frames[:-MAX_WAITING_FRAMES]):
                del inbox[index]
        self._posted[run_id] = time.monotonic()
        self._signal(run_id).set()
        self._expire()

    async def take(self, run_id: str, timeout_s: float) -> list[tuple]:
        """The messages posted for run_id, waiting up to timeout_s for the first."""
        signal = self._signal(run_id)
        if not self._inbox.get(run_id):
            try:
                await asyncio.wait_for(signal.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        signal.clear()
        return self._inbox.pop(run_id, [])

    async def forget(self, run_id: str) -> None:
        for table in (self._inbox, self._posted, self._signals):
            table.pop(run_id, None)

    def _expire(self) -> None:
        old = [run_id for run_id, posted in self._posted.items() if time.monotonic() - posted > FORGET_AFTER_S]
        for run_id in old:
            for table in (self._inbox, self._posted, self._signals):
                table.pop(run_id, None)
