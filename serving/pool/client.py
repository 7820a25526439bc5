"""The front end's side of the pool: starts (or joins) Ray, deploys the workers on Ray Serve and runs each visitor's
stream on one of them through a streaming handle.

Ray Serve does the routing, the queueing (one stream per worker: max_ongoing_requests=1), replica restarts and
autoscaling; this module adds what a visitor needs on top: their place in the queue with an estimated wait, Stop
and new prompts relayed to the worker running their stream, and a clear message when that worker dies or stalls.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import ray
import torch
from ray import serve
from ray.serve.config import ProxyLocation
from ray.serve.exceptions import RayServeException, RequestCancelledError

from pipelines.config import PROJECT_ROOT
from pipelines.steering import PromptSteering

from ..engine import Engine, EngineInfo, load_engine
from ..jobs import Block, Started, StreamEvent, StreamJob, WorkerLost
from .board import StreamBoard
from .waiting import PoolQueue
from .worker import StreamWorker

log = logging.getLogger(__name__)
APP_NAME = "self-forcing-pool"
DEPLOYMENT = "StreamWorker"
_END = object()


@dataclass(frozen=True)
class PoolOptions:
    workers: int = 1  # fixed pool size (without autoscaling)
    min_workers: int | None = None  # autoscaling between these two on the queue length (Ray Serve's autoscaler)
    max_workers: int | None = None
    ray_address: str | None = None  # an existing Ray cluster; None starts a local Ray instance
    gpus_per_worker: float = 1.0  # fractions pack several workers on one GPU
    cpus_per_worker: float = 1.0
    stall_s: float = 120.0  # a started stream that sends nothing for this long counts as a lost worker
    max_waiting: int = 16  # requests that may wait for a worker at once (more are refused with a message)

    @property
    def largest(self) -> int:
        return self.max_workers or self.workers

    def scaling(self) -> dict:
        if self.max_workers is None:
            return {"num_replicas": self.workers}
        low = self.min_workers if self.min_workers is not None else 1
        return {"autoscaling_config": {"min_replicas": low, "initial_replicas": max(low, 1),
                                       "max_replicas": self.max_workers, "target_ongoing_requests": 1,
                                       "upscale_delay_s": 3, "downscale_delay_s": 120}}


class PoolError(RuntimeError):
    """The pool cannot start as asked; the message says why and what to change."""


def worker_resources(options: PoolOptions, cluster: dict) -> dict:
    """Each worker's Ray resources on this cluster (CPUs only when it has no GPU), or PoolError when the workers
    that must start at once do not fit (Ray Serve would wait for them forever)."""
    gpus = options.gpus_per_worker if cluster.get("GPU", 0) > 0 else 0
    needed = options.min_workers if options.max_workers is not None else options.workers
    needed = max(needed or 1, 1)
    for name, each in (("GPU", gpus), ("CPU", options.cpus_per_worker)):
        have = cluster.get(name, 0)
        if each and needed * each > have + 1e-9:
            fitting = int(have // each)
            raise PoolError(f"{needed} workers x {each:g} {name} do not fit the Ray cluster's {have:g} {name}s: "
                            f"start {fitting} worker{'s' if fitting != 1 else ''}, or give each less "
                            f"(--{name.lower()}s-per-worker), or add machines to the cluster.")
    return {"num_gpus": gpus, "num_cpus": options.cpus_per_worker}


def engine_factory(**load_options) -> Callable[[], Engine]:
    """What each worker runs at start: load_engine with the app's model options (picklable). Paths given relative
    to this process's folder are made absolute (a worker starts elsewhere)."""
    for key in ("config_path", "weights", "prompt_extender", "compile_cache"):
        value = load_options.get(key)
        if value and not str(value).startswith("hf://") and Path(value).expanduser().exists():
            load_options[key] = str(Path(value).expanduser().resolve())
    return functools.partial(load_engine, **load_options)


class PoolBackend:
    """Streams on a Ray Serve pool of StreamWorkers (the app with --workers, --max-workers or --ray-address)."""

    pooled = True

    def __init__(self, make_engine: Callable[[], Engine], options: PoolOptions) -> None:
        self.options = options
        self.queue = PoolQueue()
        self.concurrency = options.largest + options.max_waiting
        self._workers_seen = (0.0, 0)
        start_ray(options.ray_address)
        resources = worker_resources(options, ray.cluster_resources())
        if options.gpus_per_worker and not resources["num_gpus"]:
            log.warning("no GPUs in the Ray cluster: the workers run on CPUs")
        self.board = StreamBoard.remote()
        deployment = serve.deployment(
            StreamWorker, name=DEPLOYMENT, max_ongoing_requests=1, health_check_period_s=5,
            health_check_timeout_s=60, graceful_shutdown_timeout_s=10, ray_actor_options=resources,
            **options.scaling())
        log.info("starting the pool: %s", options)
        serve.start(proxy_location=ProxyLocation.Disabled)
        self.handle = serve.run(deployment.bind(make_engine, self.board), name=APP_NAME, route_prefix=None,
                                logging_config={"enable_access_log": False})
        self._info = self.handle.info.remote().result()
        log.info("pool ready: %d workers", self.live_workers(fresh=True))

    def info(self) -> EngineInfo:
        return self._info

    def live_workers(self, fresh: bool = False) -> int:
        """Workers ready for a stream (asked of Ray Serve at most every 2 s)."""
        checked, count = self._workers_seen
        if not ray.is_initialized():  # (shut down: asking would start a new Ray instance)
            return 0
        if fresh or time.monotonic() - checked > 2:
            try:
                states = serve.status().applications[APP_NAME].deployments[DEPLOYMENT].replica_states
                count = int(states.get("RUNNING", 0))
            except (KeyError, ray.exceptions.RayError):
                count = 0
            self._workers_seen = (time.monotonic(), count)
        return count

    def redecode(self, latents: list[torch.Tensor], fps: int) -> tuple[bytes, int]:
        try:
            return self.handle.redecode.remote(latents, fps).result()
        except ray.exceptions.RayActorError as err:
            raise WorkerLost("The worker re-decoding your video stopped; please try again.") from err

    def stream(self, job: StreamJob, cancel: Callable[[], bool], steering: PromptSteering) -> Iterator[StreamEvent]:
        """The job's events from whichever worker Ray Serve gives it, with Waiting events (about once a second)
        until it starts. A request that never started on a worker that died is sent again."""
        if self.queue.waiting >= self.options.max_waiting:
            raise WorkerLost(f"The queue is full ({self.options.max_waiting} waiting): please try again in a few "
                             "minutes.")
        ticket = self.queue.join()
        try:
            for attempt in range(3):
                run = PoolStream(self, job, ticket, cancel, steering)
                try:
                    yield from run.events()
                    return
                except WorkerLost:
                    if run.started or attempt == 2:
                        raise
                    log.warning("a worker died before starting a queued stream: sending it again")
        finally:
            self.queue.leave(ticket)

    def replace_worker(self, actor_name: str | None) -> None:
        """Kills a stalled worker; Ray Serve starts a new one."""
        if not actor_name:
            return
        try:
            ray.kill(ray.get_actor(actor_name, namespace="serve"), no_restart=True)
            log.warning("replaced stalled worker %s", actor_name)
        except (ValueError, ray.exceptions.RayError):
            log.exception("could not kill stalled worker %s", actor_name)

    def shutdown(self) -> None:
        """Stops this process's router first (its metrics loop would otherwise run on past `ray.shutdown()` and log
        errors at exit), then removes the pool's workers (unless Ray is already shut down: asking would start it)."""
        self.handle.shutdown()
        if not ray.is_initialized():
            return
        try:
            serve.delete(APP_NAME)
        except (ray.exceptions.RayError, RayServeException):
            pass


class PoolStream:
    """One attempt at running a job on the pool, consumed by the visitor's handler thread."""

    def __init__(self, pool: PoolBackend, job: StreamJob, ticket: int, cancel: Callable[[], bool],
                 steering: PromptSteering) -> None:
        self.camera = job.camera  # the visitor's camera feed: its frames go to the worker through the board
        if job.camera is not None:
            job = dataclasses.replace(job, camera=None, camera_relay=True)
        self.pool, self.job, self.ticket, self.cancel, self.steering = pool, job, ticket, cancel, steering
        self.run_id = uuid.uuid4().hex
        self.started: Started | None = None
        self.inbox: queue.Queue = queue.Queue()
        self.response = pool.handle.options(stream=True).stream.remote(job, self.run_id)
        threading.Thread(target=self._pump, name=f"pool-{self.run_id}", daemon=True).start()

    def _pump(self) -> None:
        """Moves the worker's events into the inbox (so the handler can wait with a timeout and relay controls)."""
        try:
            for item in self.response:
                self.inbox.put(item)
        except RequestCancelledError:
            pass
        except BaseException as err:
            self.inbox.put(err)
        self.inbox.put(_END)

    def _relay_camera(self, board) -> None:
        """The camera frames that arrived since the last call, to the worker (the board keeps the latest few while
        the stream waits for one: a pose run reads its first frame before it starts), and the feed's end."""
        frames, closed = self.camera.drain()
        for frame in frames:
            board.post.remote(self.run_id, ("frame", frame))
        if closed:
            board.post.remote(self.run_id, ("frames_end",))
            self.camera = None

    def events(self) -> Iterator[StreamEvent]:
        pool, board = self.pool, self.pool.board
        stop_sent, finished = False, False
        last_event = time.monotonic()
        last_waiting = last_event - 0.7  # (the first Waiting after 0.3 s: a free worker starts sooner)
        try:
            while True:
                if self.cancel() and not stop_sent:
                    stop_sent = True
                    if self.started is None:
                        return  # (dropped while waiting: the finally cancels the request)
                    board.post.remote(self.run_id, ("stop",))
                if (switch := self.steering.take()) is not None:
                    board.post.remote(self.run_id, ("steer", switch.prompt, switch.mode))
                if self.camera is not None:
                    self._relay_camera(board)
                try:
                    item = self.inbox.get(timeout=0.05)
                except queue.Empty:
                    now = time.monotonic()
                    if self.started is None and now - last_waiting >= 1.0:
                        last_waiting = now
                        yield pool.queue.status(self.ticket, pool.live_workers())
                    elif self.started is not None and now - last_event > pool.options.stall_s:
                        pool.replace_worker(self.started.worker_actor)
                        raise WorkerLost(f"The worker running your video sent nothing for {pool.options.stall_s:.0f} s "
                                         "and was replaced.")
                    continue
                last_event = time.monotonic()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, ray.exceptions.RayActorError):
                    raise WorkerLost("The worker running your video stopped unexpectedly (it is being restarted)."
                                     ) from item
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Started):
                    self.started = item
                    pool.queue.start(self.ticket, item, self.job.continuous)
                elif isinstance(item, Block):
                    pool.queue.progress(self.ticket, item)
                yield item
        finally:
            if not finished:
                self.response.cancel()
                board.post.remote(self.run_id, ("stop",))


def start_ray(address: str | None) -> None:
    """Joins the Ray cluster at `address`, or starts a local one; workers import this project from its folder
    (each machine of a cluster needs the project at the same path, and the weights)."""
    if ray.is_initialized():
        return
    path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    try:
        ray.init(address=address, include_dashboard=False, namespace="self-forcing", logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": path, "GRPC_ENABLE_FORK_SUPPORT": "0"}})
    except ConnectionError as err:
        raise ConnectionError(f"{err}. A cluster started with `ray start` uses token authentication (Ray 2.59 and "
                              "later): start the app with RAY_AUTH_MODE=token set, and on another machine than "
                              "the head also RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints it).") from err
