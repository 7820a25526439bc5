"""A pool that grows with its queue: Ray Serve's autoscaler between --min-workers and --max-workers (CPUs only)."""
from __future__ import annotations

import logging
import threading
import time

import pytest

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.pool


def test_the_pool_grows_while_visitors_wait(caplog):
    import ray

    from pipelines.config import DEFAULT_CONFIG
    from pipelines.steering import PromptSteering
    from serving.jobs import Block, StreamJob
    from serving.pool.client import PoolBackend, PoolOptions, engine_factory

    backend = PoolBackend(engine_factory(config_path=str(DEFAULT_CONFIG), weights=None, device="cpu"),
                          PoolOptions(min_workers=1, max_workers=2, gpus_per_worker=0))
    try:
        assert backend.live_workers(fresh=True) == 1
        blocks: dict[int, int] = {}

        def visitor(seed: int) -> None:
            job = StreamJob(prompt="a red circle moves to the right on a dark blue background", seed=seed,
                            num_blocks=8)
            for event in backend.stream(job, lambda: False, PromptSteering()):
                blocks[seed] = blocks.get(seed, 0) + isinstance(event, Block)

        threads = [threading.Thread(target=visitor, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while backend.live_workers(fresh=True) < 2:
            assert time.monotonic() < deadline, "the pool did not grow while requests waited"
            time.sleep(1)
        for thread in threads:
            thread.join(300)
        assert all(count >= 8 for count in blocks.values()) and len(blocks) == 4, blocks
    finally:
        backend.shutdown()
        ray.shutdown()
    backend.shutdown()  # (again with Ray gone, as when Ray's own exit handler runs first: a no-op, Ray not restarted)
    assert not ray.is_initialized()
    # An autoscaled pool's router in this process pushes its queue length every few seconds; after the shutdown no
    # push may run against the Ray instance that is gone (each logged an error until the process exited).
    from ray.serve._private.constants import RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S as interval

    serve_log = logging.getLogger("ray.serve")  # (it does not propagate: pytest's handler is attached to it)
    caplog.clear()
    serve_log.addHandler(caplog.handler)
    try:
        time.sleep(interval + 1)
    finally:
        serve_log.removeHandler(caplog.handler)
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert not errors, errors
