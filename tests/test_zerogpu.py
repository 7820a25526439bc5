"""The ZeroGPU code path on the CPU, with `spaces` stubbed the way it behaves off-Space (spaces.GPU
returns the function to run), recording each call and the duration it would ask for."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from demo.session import SessionControl
from demo.streaming import stream_video
from pipelines.core import GenerationRequest
from serving.jobs import StreamJob
from serving.zerogpu import adapt_arguments, duration_for

from runtimes import local_runtime


@pytest.fixture()
def zero_gpu(monkeypatch):
    calls: list[int] = []

    def GPU(duration=None):  # noqa: N802 - the name spaces exports
        def decorate(fn):
            def run(*args, **kwargs):
                calls.append(duration(*args, **kwargs))
                return fn(*args, **kwargs)
            return run
        return decorate

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    return calls


def test_start_up_settings_on_zero_gpu(zero_gpu):
    from app import build_parser

    args = adapt_arguments(build_parser().parse_args(["--compile", "--fp8", "--attention", "flash4"]))
    assert (args.compile, args.device, args.memory_profile, args.vram_gb) == (False, "cuda", "high", 70.0)
    assert (args.fp8, args.attention) == (False, "sdpa")
    assert adapt_arguments(build_parser().parse_args(["--device", "cpu", "--vram-gb", "40"])).vram_gb == 40


def test_start_up_settings_elsewhere_are_untouched(monkeypatch):
    from app import build_parser

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    args = adapt_arguments(build_parser().parse_args(["--compile", "--memory-profile", "low", "--fp8"]))
    assert (args.compile, args.device, args.memory_profile, args.fp8, args.attention) == (True, None, "low", True,
                                                                                          "auto")


def _frames(runtime, blocks=2):
    return [r.frames for r in runtime.engine.generate_blocks(GenerationRequest("a ship", seed=4, num_blocks=blocks),
                                                       lambda: False)]


def test_generation_runs_inside_spaces_gpu_with_a_duration_for_its_length(zero_gpu, tiny_pipeline, tiny_config,
                                                                          monkeypatch):
    runtime = local_runtime(tiny_config, tiny_pipeline)
    on_zero = _frames(runtime, blocks=2)
    assert zero_gpu == [duration_for(2)] and duration_for(2) == 21 and duration_for(500) == 120
    final = list(stream_video(runtime, SessionControl(), StreamJob(prompt="a ship", num_blocks=3)))[-1]
    assert final[2].startswith("Done.") and zero_gpu[-1] == duration_for(3)
    monkeypatch.delenv("SPACES_ZERO_GPU")
    local = _frames(local_runtime(tiny_config, tiny_pipeline), blocks=2)
    assert len(zero_gpu) == 2  # the local path does not go through spaces.GPU
    assert all(np.array_equal(a, b) for a, b in zip(on_zero, local)) and len(on_zero) == len(local)


def test_stop_ends_a_zero_gpu_call_after_the_current_block(zero_gpu, tiny_pipeline, tiny_config):
    runtime = local_runtime(tiny_config, tiny_pipeline)
    session = SessionControl()
    updates = stream_video(runtime, session, StreamJob(prompt="x", num_blocks=4))
    next(updates), next(updates), next(updates)  # starting, the first frame alone, the rest of block 1
    assert session.request_stop()
    assert list(updates)[-1][2].startswith("Stopped after block 1/4")
    assert not session.is_running
