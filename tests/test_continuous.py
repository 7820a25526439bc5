"""Continuous (endless) generation: rolling window, bounded memory, progressive mp4, stop."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.core import ContextWrite, GenerationRequest, StreamingVideoPipeline, still_cached
from pipelines.loading.video_io import count_frames
from pipelines.model.kv_cache import AttentionWindow, KVCache

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def continuous_pipeline(tiny_components, tiny_config):
    # 7 blocks of video at most, a rolling window of 6 latent frames with 3 sink frames
    config = dataclasses.replace(tiny_config, continuous_minutes=7 * 12 / 16 / 60, continuous_window=[6, 3])
    return StreamingVideoPipeline(tiny_components, config)


def test_runs_to_the_limit_with_a_rolling_window_and_a_bounded_cache(continuous_pipeline, monkeypatch):
    caches: list[KVCache] = []
    original = KVCache.__init__

    def recording_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        caches.append(self)

    monkeypatch.setattr(KVCache, "__init__", recording_init)
    request = GenerationRequest("a river", seed=2, num_blocks=1, continuous=True)
    assert continuous_pipeline.validate(request).num_blocks == 7  # Blocks is ignored; the time limit counts
    results = [r for r in continuous_pipeline.generate(request) if r.complete]
    assert len(results) == 7 and results[-1].window_frames == 6
    assert caches and all(c.keys.shape[2] == 6 * 24 for c in caches)  # never more than the window
    frames = np.concatenate([r.frames for r in continuous_pipeline.generate(request)])
    assert frames.shape[0] == 1 + 4 * (7 * 3 - 1) and frames.std() > 0


def test_fixed_length_runs_keep_the_reference_noise(tiny_pipeline, continuous_pipeline):
    fixed = [r.latents for r in tiny_pipeline.generate(GenerationRequest("a river", seed=2, num_blocks=2))
             if r.complete]
    again = [r.latents for r in continuous_pipeline.generate(GenerationRequest("a river", seed=2, num_blocks=2))
             if r.complete]
    assert all(torch.equal(a, b) for a, b in zip(fixed, again))


def test_only_writes_still_in_the_cache_are_kept():
    writes = [ContextWrite(torch.zeros(1, 16, 3, 2, 2), start, 0.0, None) for start in range(0, 30, 3)]
    kept = still_cached(writes, AttentionWindow(9, 3), end_frame=30)
    assert [w.start_frame for w in kept] == [0, 24, 27]  # the sink block and the last 6 frames
    assert still_cached(writes, AttentionWindow(), 30) == writes


def test_stop_ends_a_continuous_run(continuous_pipeline):
    seen = []
    request = GenerationRequest("a river", continuous=True)
    for result in continuous_pipeline.generate(request, cancel=lambda: len(seen) >= 3):
        if result.complete:
            seen.append(result.index)
    assert seen == [0, 1, 2]


@pytest.mark.parametrize("progressive", [True, False])
def test_progressive_mp4_survives_a_killed_writer(tmp_path, progressive):
    path = tmp_path / "cut.mp4"
    script = textwrap.dedent(f"""
        import sys, time, numpy as np
        sys.path.insert(0, {str(ROOT)!r})
        from pipelines.loading.video_io import H264Writer
        writer = H264Writer({str(path)!r}, 96, 64, 16, progressive={progressive})
        writer.write(np.random.default_rng(0).integers(0, 255, (48, 64, 96, 3), dtype=np.uint8))
        ffmpeg = writer._writer.gi_frame.f_locals["p"]  # imageio-ffmpeg's encoder process
        print(ffmpeg.pid, flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    ffmpeg_pid = int(child.stdout.readline())
    time.sleep(2)  # let ffmpeg encode what it was given
    for pid in (ffmpeg_pid, child.pid):  # the app and its encoder die without closing the file
        os.kill(pid, signal.SIGKILL)
    child.wait()
    try:
        playable = count_frames(path)
    except (RuntimeError, OSError):
        playable = 0
    if progressive:
        assert playable >= 16  # the complete fragments (about one a second) play
    else:
        assert playable == 0  # the control: a plain mp4 without its index does not play
