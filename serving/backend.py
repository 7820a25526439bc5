"""What the app's front end runs streams on: this process (LocalBackend) or a Ray Serve pool (pool.PoolBackend)."""
from __future__ import annotations

from typing import Callable, Iterator, Protocol

import torch

from pipelines.steering import PromptSteering

from .engine import Engine, EngineInfo
from .jobs import StreamEvent, StreamJob


class Backend(Protocol):
    pooled: bool  # a pool of workers (server-wide changes are refused there)
    concurrency: int  # streams the front end may have open at once (running or waiting)

    def info(self) -> EngineInfo: ...

    def stream(self, job: StreamJob, cancel: Callable[[], bool], steering: PromptSteering) -> Iterator[StreamEvent]:
        """The job's events; `cancel` is polled (a Stop or a closed page), `steering` holds new prompts."""

    def redecode(self, latents: list[torch.Tensor], fps: int) -> tuple[bytes, int]: ...

    def live_workers(self) -> int: ...


class LocalBackend:
    """Streams in the app's own process, one at a time (the app without --workers)."""

    pooled = False
    concurrency = 1

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def info(self) -> EngineInfo:
        return self.engine.info()

    def stream(self, job: StreamJob, cancel: Callable[[], bool], steering: PromptSteering) -> Iterator[StreamEvent]:
        return self.engine.run(job, cancel, steering)

    def redecode(self, latents: list[torch.Tensor], fps: int) -> tuple[bytes, int]:
        return self.engine.redecode(latents, fps)

    def live_workers(self) -> int:
        return 1
