"""The UI's handler and runtime without a browser: missing weights, OOM, weights sources, sessions."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
import torch
from omegaconf import OmegaConf

from demo.runtime import load_runtime
from demo.session import SessionControl
from demo.streaming import parse_resolution, pick_seed, stream_video
from demo.ui import build_demo
from pipelines.core import StreamingVideoPipeline
from pipelines.loading.weights import WeightsError
from serving.engine import resolve_weights_source

from runtimes import local_runtime
from tiny_checkpoints import write_original_layout

ROOT = Path(__file__).resolve().parent.parent
from serving.jobs import StreamJob


def test_missing_weights_keep_app_alive_with_clear_message(tmp_path):
    runtime = load_runtime("configs/self_forcing_dmd.yaml", str(tmp_path))
    assert runtime.engine.pipeline is None
    assert "Wan-AI/Wan2.1-T2V-1.3B" in runtime.banner()
    build_demo(runtime)  # the page still builds, so the app can serve the message
    with pytest.raises(gr.Error, match="Wan-AI/Wan2.1-T2V-1.3B"):
        next(stream_video(runtime, SessionControl(), StreamJob(prompt="x")))


def test_runtime_loads_real_layout_from_a_local_weights_folder(tmp_path, tiny_components):
    """The path a user (or a Space after download) takes: auto layout + Self-Forcing checkpoint."""
    weights = tmp_path / "weights"
    write_original_layout(tiny_components, weights)
    config = OmegaConf.load(ROOT / "configs/tiny.yaml")
    config.weights = {"layout": "auto", "generator_ckpt": "checkpoints/self_forcing_dmd.pt"}
    config.pop("demo")  # the random model's note
    OmegaConf.save(config, tmp_path / "tiny_from_files.yaml")
    runtime = load_runtime(tmp_path / "tiny_from_files.yaml", str(weights))
    assert runtime.engine.pipeline is not None and "random weights" not in runtime.banner()
    banner = runtime.banner()
    assert "self_forcing_dmd.pt" in banner and "…/" + weights.parent.name + "/weights" in banner
    assert str(weights) not in banner  # (a hosted demo must not show the server's layout)
    final = list(stream_video(runtime, SessionControl(), StreamJob(prompt="x", num_blocks=1)))[-1]
    assert final[2].startswith("Done.")


def test_weights_source_errors(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights_source(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="owner/repo"):
        resolve_weights_source("hf://owner/repo", cache_dir=tmp_path)
    assert resolve_weights_source(None) is None


class _OomAfterFirstBlock(StreamingVideoPipeline):
    def generate(self, request, cancel=None):
        iterator = super().generate(request, cancel)
        yield next(iterator)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")


def test_cuda_oom_becomes_user_error_and_lock_is_released(tiny_components, tiny_config):
    runtime = local_runtime(tiny_config,
                      pipeline=_OomAfterFirstBlock(tiny_components, tiny_config))
    session = SessionControl()
    updates = stream_video(runtime, session, StreamJob(prompt="x", num_blocks=3))
    next(updates)  # "Starting"
    next(updates)  # block 1
    with pytest.raises(gr.Error, match="Out of GPU memory"):
        next(updates)
    assert not runtime.engine.gpu_lock.locked()
    runtime.engine.pipeline = StreamingVideoPipeline(tiny_components, tiny_config)
    assert list(stream_video(runtime, session, StreamJob(prompt="x", num_blocks=1)))[-1][2].startswith("Done.")


def test_stop_flag_is_per_session(tiny_pipeline, tiny_config):
    runtime = local_runtime(tiny_config, tiny_pipeline)
    stopped, other = SessionControl(), SessionControl()
    updates = stream_video(runtime, stopped, StreamJob(prompt="x", num_blocks=4))
    next(updates), next(updates)
    stopped.stop_requested.set()
    final = list(updates)[-1]
    assert final[2].startswith("Stopped after block 1/4")
    assert not other.stop_requested.is_set()
    assert list(stream_video(runtime, other, StreamJob(prompt="x", num_blocks=2)))[-1][2].startswith("Done.")
    assert stopped.output_dir != other.output_dir


def test_session_state_survives_gradio_deepcopy():
    import copy
    session = SessionControl()
    assert copy.deepcopy(session) is session


def test_seed_and_resolution_helpers():
    assert pick_seed(5, False) == 5
    assert pick_seed(2**53 - 1, False) == 2**53 - 1  # the largest seed every client represents exactly
    assert 0 <= pick_seed(5, True) <= 2**53 - 1
    for bad in (2**53, 2**63, 1e30, -1, 2.5, "9223372036854775808", "abc", float("nan")):
        with pytest.raises(gr.Error, match="Seed must be a whole number"):
            pick_seed(bad, False)
    assert parse_resolution("832x480") == (480, 832)
    with pytest.raises(gr.Error):
        parse_resolution("big")


def test_memory_profile_can_be_changed_at_runtime(tiny_config):
    runtime = load_runtime("configs/tiny.yaml", None, "cpu", admin_token="secret")
    assert runtime.engine.memory_plan.profile.name == "high"
    for wrong in (None, "", "guess"):
        with pytest.raises(PermissionError, match="admin token"):
            runtime.set_memory_profile("low", wrong)
    assert runtime.engine.pipeline.generator.weight_streamer is None
    summary = runtime.set_memory_profile("low", "secret")
    assert "**low**" in summary and runtime.engine.pipeline.generator.weight_streamer is not None
    final = list(stream_video(runtime, SessionControl(), StreamJob(prompt="x", num_blocks=1)))[-1]
    assert final[2].startswith("Done.")
    runtime.set_memory_profile("high", "secret")
    assert runtime.engine.pipeline.generator.weight_streamer is None


def test_stop_drops_a_waiting_request_and_a_new_prompt_reaches_it(tiny_pipeline, tiny_config):
    """Stop pressed while the request still waits for the GPU: it never runs. A new prompt sent while it waits is
    the one its blocks follow. The queue gauge counts waiting requests."""
    from demo.handlers import Handlers

    runtime = local_runtime(tiny_config, tiny_pipeline)
    handlers, session, other = Handlers(runtime), runtime.new_session(), runtime.new_session()
    args = ("a red circle moves to the right on a dark blue background", "", 3, False, 2, 16, "96x64", False, "",
            None, 1.0, False, False, 0.0, session, None)
    handlers.request_sent(session)
    assert runtime.queue_length() == 1 and not other.is_waiting
    assert handlers.request_stop(session) == "Stopped: the waiting request will not run."
    [update] = list(handlers.text_to_video(*args))
    assert update[2] == "Stopped before it started." and runtime.queue_length() == 0
    assert handlers.request_stop(session) == "Nothing is running."

    handlers.request_sent(session)
    assert handlers.steer("a green square moves up on a black background", "recache", session).startswith("New prompt")
    pending = session.steering
    assert list(handlers.text_to_video(*args))[-1][2].startswith("Done.")
    assert pending.take() is None  # the run took the switch (before its first block)
    session.STEER_GRACE_S = 0.01
    assert handlers.steer("a blue star", "plain", session) == "Nothing is running: press Generate."


def test_continuous_runs_show_the_video_made_and_the_cap(tiny_pipeline, tiny_config):
    runtime = local_runtime(tiny_config, tiny_pipeline)
    session = SessionControl()
    updates = stream_video(runtime, session, StreamJob(prompt="x", continuous=True))
    assert next(updates)[2].startswith(f"Starting: continuous, up to {tiny_config.continuous_minutes:g} min of video")
    statuses = [next(updates)[2] for _ in range(3)]
    assert all(f"of video (stops at {tiny_config.continuous_minutes:g} min)" in s for s in statuses), statuses
    assert not any("Block" in s for s in statuses)
    session.stop_requested.set()
    assert list(updates)[-1][2].startswith("Stopped.")


def test_the_lora_menu_says_how_to_give_loras(tiny_config, tmp_path):
    assert "--weights DIR" in local_runtime(tiny_config).info.lora_note
    assert local_runtime(tiny_config, lora_dir=tmp_path).info.lora_note == "none found in <weights>/loras/"


def test_pages_show_no_server_paths_and_no_false_alarms(tiny_config, tmp_path):
    """A weights folder of LoRAs beside the embedded model: the banner names the folder shortly and does not say
    that no model can run; an unreadable LoRA is not offered; messages show <weights> for the folder."""
    from pipelines.weights_inspector import inspect_folder

    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "junk.safetensors").write_bytes(b"junk")
    runtime = load_runtime("configs/tiny.yaml", str(tmp_path), "cpu")
    assert runtime.engine.weights_report == inspect_folder(tmp_path) or runtime.engine.weights_report is not None
    banner = runtime.banner()
    assert str(tmp_path) not in banner and "Cannot run" not in banner, banner
    assert str(ROOT) not in banner
    assert runtime.engine.lora_names() == []  # (the inspection found junk.safetensors unreadable)
    assert runtime.public(f"Could not read {tmp_path}/loras/x.safetensors") == "Could not read <weights>/loras/x.safetensors"
    with pytest.raises(ValueError, match="LoRA strength must be between 0 and 2"):
        runtime.check_lora(None, 100)


def test_loading_says_nothing_about_an_empty_float32_list(tiny_config):
    """diffusers warns about an empty list of float32 modules on every cast; a real list still gets through."""
    import logging

    from pipelines.loading.weights import load_components

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers.models.modeling_utils")  # (diffusers' loggers do not propagate)
    logger.addHandler(handler)
    library, level = logging.getLogger("diffusers"), logging.getLogger("diffusers").level
    library.setLevel(logging.WARNING)  # (conftest quiets diffusers)
    try:
        load_components(tiny_config).generator.to(torch.float64)
        assert not [r for r in records if "kept in float32" in r.getMessage()]
        logger.warning("There are modules in X that should be kept in float32: ['norm'].")
        assert [r.getMessage() for r in records] == ["There are modules in X that should be kept in float32: ['norm']."]
    finally:
        logger.removeHandler(handler)
        library.setLevel(level)


def test_the_operators_cap_on_pixels_times_blocks(tiny_pipeline, tiny_config):
    runtime = local_runtime(tiny_config, tiny_pipeline, max_pixel_blocks=96 * 64 * 2)
    runtime.check_cost(2, 64, 96, continuous=False)
    runtime.check_cost(500, 64, 96, continuous=True)  # (continuous runs stop at continuous_minutes)
    with pytest.raises(ValueError, match="at most 12,288 pixels x blocks per video: 96x64 allows 2 blocks"):
        runtime.check_cost(3, 64, 96, continuous=False)
    session = SessionControl()
    with pytest.raises(gr.Error, match="allows 2 blocks"):
        list(stream_video(runtime, session, StreamJob(prompt="x", num_blocks=3, height=64, width=96)))
