"""The pool's queue arithmetic and options, without Ray: where a visitor waits and for how long."""
from __future__ import annotations

import pytest

from app import build_parser, pool_options
from serving.jobs import Block, Started
from serving.pool.client import PoolError, worker_resources
from serving.pool.waiting import PoolQueue, estimate_wait


def test_the_wait_is_the_time_until_a_worker_frees_for_each_request_ahead():
    # Two workers busy for 10 s and 4 s more; runs take 12 s.
    assert estimate_wait(1, 2, [10.0, 4.0], 12.0) == 4.0  # next in line: the first worker to free up
    assert estimate_wait(2, 2, [10.0, 4.0], 12.0) == 10.0  # the other one
    assert estimate_wait(3, 2, [10.0, 4.0], 12.0) == 16.0  # after the first one's next run (4 + 12)
    assert estimate_wait(1, 3, [10.0, 4.0], 12.0) == 0.0  # a free worker
    assert estimate_wait(2, 2, [10.0, 4.0], None) is None  # requests ahead and nothing measured: unknown
    assert estimate_wait(1, 0, [], 12.0) is None
    # More streams than live workers (a worker was just lost): the two soonest to end hold the live workers.
    assert estimate_wait(1, 2, [10.0, 4.0, 1.0], 12.0) == 1.0 and estimate_wait(3, 2, [10.0, 4.0, 1.0], 12.0) == 13.0


def _started(blocks: int) -> Started:
    return Started(blocks, 64, 96, 0, "p", None, "")


def _block(index: int) -> Block:
    return Block(index, 4, True, 12, b"", b"", b"")


def test_the_queue_counts_places_and_learns_run_times(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("serving.pool.waiting.time.monotonic", lambda: clock[0])
    queue = PoolQueue()
    running, first, second = queue.join(), queue.join(), queue.join()
    queue.start(running, _started(4), continuous=False)
    assert queue.waiting == 2
    assert queue.status(second, workers=1).position == 2
    assert queue.status(first, workers=1).estimate_s is None  # nothing measured, no block done yet
    clock[0] += 3.0
    queue.progress(running, _block(0))  # 1 of 4 blocks in 3 s: 9 s to go
    status = queue.status(first, workers=1)
    assert (status.position, status.waiting, status.workers, status.estimate_s) == (1, 2, 1, 9.0)
    for index in range(1, 4):
        queue.progress(running, _block(index))
    clock[0] += 9.0
    queue.leave(running)
    assert queue.typical_run_s() == 12.0  # the finished run's time
    queue.leave(first)  # (dropped while waiting: no run time)
    assert queue.typical_run_s() == 12.0 and queue.status(second, workers=1).position == 1


def test_the_pool_flags(tmp_path):
    assert pool_options(build_parser().parse_args([])) is None  # no flag: no pool, no Ray
    options = pool_options(build_parser().parse_args(["--workers", "3", "--gpus-per-worker", "0.5"]))
    assert options.scaling() == {"num_replicas": 3} and options.gpus_per_worker == 0.5
    scaled = pool_options(build_parser().parse_args(["--min-workers", "1", "--max-workers", "4"]))
    config = scaled.scaling()["autoscaling_config"]
    assert (config["min_replicas"], config["max_replicas"], config["target_ongoing_requests"]) == (1, 4, 1)
    assert scaled.largest == 4
    remote = pool_options(build_parser().parse_args(["--ray-address", "10.0.0.1:6379"]))
    assert remote.ray_address == "10.0.0.1:6379" and remote.workers == 1


@pytest.mark.parametrize("flag", ["--workers", "--max-workers"])
def test_pool_flags_are_documented(flag, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert flag in capsys.readouterr().out


def test_a_pool_that_cannot_fit_the_cluster_is_refused_with_what_fits():
    cpu_box, gpu_box = {"CPU": 2.0}, {"CPU": 16.0, "GPU": 2.0}
    assert worker_resources(pool_options(build_parser().parse_args(["--workers", "2"])), cpu_box) == \
        {"num_gpus": 0, "num_cpus": 1.0}  # (no GPU in the cluster: workers on CPUs)
    with pytest.raises(PoolError, match="4 workers x 1 CPU do not fit the Ray cluster's 2 CPUs: start 2 workers"):
        worker_resources(pool_options(build_parser().parse_args(["--workers", "4"])), cpu_box)
    with pytest.raises(PoolError, match="3 workers x 1 GPU do not fit the Ray cluster's 2 GPUs: start 2 workers"):
        worker_resources(pool_options(build_parser().parse_args(["--workers", "3"])), gpu_box)
    packed = pool_options(build_parser().parse_args(["--workers", "4", "--gpus-per-worker", "0.5"]))
    assert worker_resources(packed, gpu_box) == {"num_gpus": 0.5, "num_cpus": 1.0}
    growing = pool_options(build_parser().parse_args(["--min-workers", "1", "--max-workers", "8"]))
    assert worker_resources(growing, gpu_box)["num_gpus"] == 1.0  # (only the first worker must fit at start)
