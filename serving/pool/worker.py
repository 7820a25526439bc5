"""One pool worker (a Ray Serve replica): a whole Engine on its own GPU (or share of one), one stream at a time."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import AsyncIterator, Callable

import ray
import torch
from ray import serve

from pipelines.steering import PromptSteering
from pipelines.video_input import LiveFrames

from ..engine import Engine, EngineInfo
from ..jobs import Started, StreamEvent, StreamJob

log = logging.getLogger(__name__)
POLL_S = 0.5  # how long one long-poll of the control board waits
_END = object()


class StreamWorker:
    """Ray Serve deployment class (pool.client deploys it with the pool's options)."""

    def __init__(self, make_engine: Callable[[], Engine], board) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.engine = make_engine()
        self.board = board
        context = serve.get_replica_context()
        self.name = context.replica_id.unique_id
        self.actor = ray.get_runtime_context().get_actor_name()
        log.info("worker %s ready: %s", self.name, self.engine.banner())

    def info(self) -> EngineInfo:
        return self.engine.info()

    def redecode(self, latents: list[torch.Tensor], fps: int) -> tuple[bytes, int]:
        return self.engine.redecode(latents, fps)

    async def stream(self, job: StreamJob, run_id: str) -> AsyncIterator[StreamEvent]:
        """The job's events. The run itself goes on in a thread (the replica's event loop stays free for health
        checks); a cancelled request (the visitor left) or a Stop on the board stops it after its current block."""
        stop, done = threading.Event(), threading.Event()
        steering = PromptSteering()
        camera = LiveFrames(keep_up=True) if job.camera_relay else None  # the visitor's camera frames, relayed by the board
        if camera is not None:
            job = dataclasses.replace(job, camera=camera)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def listen() -> None:
            while not done.is_set():
                try:
                    messages = ray.get(self.board.take.remote(run_id, POLL_S))
                except ray.exceptions.RayError:
                    log.exception("control board unreachable: stopping stream %s", run_id)
                    stop.set()
                    return
                for message in messages:
                    if message[0] == "stop":
                        stop.set()
                        if camera is not None:
                            camera.close()  # (a run waiting for frames stops at once)
                    elif message[0] == "steer":
                        steering.post(message[1], message[2])
                    elif message[0] == "frame" and camera is not None:
                        camera.push(message[1])
                    elif message[0] == "frames_end" and camera is not None:
                        camera.close()

        def produce() -> None:
            try:
                for event in self.engine.run(job, stop.is_set, steering):
                    if isinstance(event, Started):
                        event.worker, event.worker_actor = self.name, self.actor
                    loop.call_soon_threadsafe(events.put_nowait, event)
            except BaseException as err:  # (sent to the front end, which says what happened)
                loop.call_soon_threadsafe(events.put_nowait, err)
            finally:
                done.set()
                self.board.forget.remote(run_id)
                loop.call_soon_threadsafe(events.put_nowait, _END)

        threading.Thread(target=listen, name=f"board-{run_id}", daemon=True).start()
        threading.Thread(target=produce, name=f"stream-{run_id}", daemon=True).start()
        try:
            while (item := await events.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # (cancelled: the run ends after its current block, then frees the model for the next)
