"""The worker pool on a local Ray started by this module (CPUs only): two workers of the embedded tiny model behind
the real front end, served on 127.0.0.1. One pool for the whole module keeps Ray's start-up out of each test."""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from app_server import free_port, serve_in_thread

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.pool

PROMPT = "a red circle moves to the right on a dark blue background"
OTHER = "a green square moves up on a black background"
STALL_S = 15.0


class StartedSpy:
    """Records each stream's Started event (its worker's pid) by the job's seed, as the front end receives it."""

    def __init__(self, backend) -> None:
        self.started: dict[int, object] = {}
        stream = backend.stream

        def spied(job, cancel, steering):
            for event in stream(job, cancel, steering):
                if type(event).__name__ == "Started":
                    self.started[job.seed] = event
                yield event

        backend.stream = spied

    def pid(self, seed: int, timeout_s: float = 60) -> int:
        deadline = time.monotonic() + timeout_s
        while seed not in self.started:
            assert time.monotonic() < deadline, "the stream never started"
            time.sleep(0.05)
        return self.started[seed].worker_pid


class PoolApp:
    def __init__(self, runtime, store, url: str, spy: StartedSpy) -> None:
        self.runtime, self.store, self.url, self.spy = runtime, store, url, spy

    def wait_for_workers(self, count: int = 2, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while self.runtime.backend.live_workers(fresh=True) < count:
            assert time.monotonic() < deadline, "the pool did not bring its workers back"
            time.sleep(1)


@pytest.fixture(scope="module")
def pool_app(tmp_path_factory):
    import ray

    from app import make_server
    from demo.outputs import OutputStore
    from demo.runtime import front_end
    from demo.ui import build_demo
    from pipelines.config import DEFAULT_CONFIG
    from serving.pool.client import PoolBackend, PoolOptions, engine_factory

    store = OutputStore(tmp_path_factory.mktemp("pool-outputs"))
    weights = pool_weights(tmp_path_factory.mktemp("pool-weights"))
    backend = PoolBackend(engine_factory(config_path=str(DEFAULT_CONFIG), weights=str(weights), device="cpu"),
                          PoolOptions(workers=2, gpus_per_worker=0, stall_s=STALL_S))
    runtime = front_end(backend, weights, outputs=store)
    spy = StartedSpy(backend)
    demo = build_demo(runtime)
    demo.queue(max_size=32, default_concurrency_limit=1)
    port = free_port()
    server = make_server(demo, runtime, "127.0.0.1", port, [str(store.sessions)])
    thread = serve_in_thread(server)
    yield PoolApp(runtime, store, f"http://127.0.0.1:{port}/", spy)
    server.should_exit = True
    thread.join(20)
    backend.shutdown()
    ray.shutdown()
    store.remove_sessions()


def pool_weights(folder: Path) -> Path:
    """A weights folder beside the embedded model: a LoRA, the fast decoder and a prompt extender (each worker
    reads it, as each machine of a cluster would read its own copy)."""
    import torch
    from safetensors.torch import save_file
    from test_tiny_decoder import taew2_1_state

    from tiny_checkpoints import write_tiny_causal_lm

    (folder / "loras").mkdir()
    rng = torch.Generator().manual_seed(0)
    lora = {}
    for block in range(6):
        for layer in ("attn1.to_q", "attn1.to_v", "ffn.net.0.proj"):
            out_features = 576 if layer.startswith("ffn") else 192
            lora[f"transformer.blocks.{block}.{layer}.lora_A.weight"] = torch.randn(4, 192, generator=rng) * 0.3
            lora[f"transformer.blocks.{block}.{layer}.lora_B.weight"] = torch.randn(out_features, 4, generator=rng) * 0.3
    save_file(lora, str(folder / "loras" / "strong.safetensors"))
    torch.save(taew2_1_state(), folder / "taew2_1.pth")
    write_tiny_causal_lm(folder / "prompt_extender")
    return folder


class Visitor:
    """One browser session's stream through the front end, run in its own thread; updates are time-stamped."""

    def __init__(self, app: PoolApp, seed: int, blocks: int, prompt: str = PROMPT, **job) -> None:
        from demo.handlers import Handlers
        from serving.jobs import StreamJob

        self.app, self.seed = app, seed
        self.handlers = Handlers(app.runtime)
        self.session = app.runtime.new_session()
        self.job = StreamJob(prompt=prompt, seed=seed, num_blocks=blocks, **job)
        self.updates: list[tuple[float, tuple]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Visitor":
        self.session.request_sent()
        self.thread.start()
        return self

    def _run(self) -> None:
        from demo.streaming import stream_video

        try:
            for update in stream_video(self.app.runtime, self.session, self.job):
                self.updates.append((time.monotonic(), update))
        except BaseException as err:  # (asserted by the test)
            self.error = err
        finally:
            self.session.request_done()

    def block_times(self) -> list[float]:
        return [t for t, update in self.updates if isinstance(update[0], str)]

    def statuses(self) -> list[str]:
        return [update[2] for _, update in self.updates if isinstance(update[2], str)]

    def wait_for_blocks(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.block_times()) < count:
            assert time.monotonic() < deadline and self.thread.is_alive(), self.statuses()[-3:]
            time.sleep(0.05)

    def final(self, timeout_s: float = 120) -> tuple:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the stream did not end"
        assert self.error is None, repr(self.error)
        return self.updates[-1][1]


def test_two_visitors_stream_at_once_and_a_third_waits_with_its_place(pool_app):
    pool_app.wait_for_workers()
    first, second = Visitor(pool_app, 1, 6).start(), Visitor(pool_app, 2, 6).start()
    first.wait_for_blocks(1)
    second.wait_for_blocks(1)
    third = Visitor(pool_app, 3, 2).start()
    for visitor in (first, second, third):
        assert visitor.final()[2].startswith("Done."), visitor.statuses()[-2:]
    # The two streams ran side by side on the two workers ...
    assert max(first.block_times()[0], second.block_times()[0]) < min(first.block_times()[-1],
                                                                       second.block_times()[-1])
    assert pool_app.spy.started[1].worker != pool_app.spy.started[2].worker
    # ... and the third waited, told its place, until one of them was done.
    waiting = [s for s in third.statuses() if s.startswith("Waiting for a free worker")]
    assert waiting and "1 of 1 in the queue" in waiting[0] and "2 workers busy" in waiting[0], third.statuses()[:3]
    assert third.block_times()[0] > min(first.block_times()[-1], second.block_times()[-1])
    # Once runs were measured, a waiting visitor is told how long it should take.
    assert pool_app.runtime.backend.queue.typical_run_s() is not None


def test_stop_and_steer_reach_the_run_they_were_meant_for(pool_app):
    pool_app.wait_for_workers()
    steered, stopped = Visitor(pool_app, 11, 6).start(), Visitor(pool_app, 12, 10).start()
    steered.wait_for_blocks(1)
    stopped.wait_for_blocks(1)
    assert steered.handlers.steer(OTHER, "recache", steered.session).startswith("New prompt")
    assert stopped.handlers.request_stop(stopped.session) == "Stopping after the current block …"
    final = stopped.final()
    assert final[2].startswith("Stopped after block") and "/10" in final[2], final[2]
    assert OTHER not in (final[6] or "")
    final = steered.final()
    assert final[2].startswith("Done.") and OTHER in final[6], final[6]  # the prompt timeline shows the switch


def test_a_killed_worker_tells_its_visitor_and_the_pool_recovers(pool_app):
    from pipelines.loading.video_io import count_frames

    pool_app.wait_for_workers()
    doomed, bystander = Visitor(pool_app, 21, 10).start(), Visitor(pool_app, 22, 5).start()
    doomed.wait_for_blocks(6)
    os.kill(pool_app.spy.pid(21), signal.SIGKILL)
    final = doomed.final()
    assert "stopped unexpectedly" in final[2] and "already streamed" in final[2], final[2]
    assert count_frames(final[3]) >= 16  # whole seconds of the blocks that were streamed, playable
    assert bystander.final()[2].startswith("Done.")
    pool_app.wait_for_workers()  # Ray Serve replaced the worker ...
    assert Visitor(pool_app, 23, 2).start().final()[2].startswith("Done.")  # ... and the pool serves again
    assert 'sf_worker_restarts_total 1.0' in _metrics(pool_app)


def test_a_stalled_worker_is_replaced_and_its_visitor_told(pool_app):
    pool_app.wait_for_workers()
    stalled = Visitor(pool_app, 31, 10).start()
    stalled.wait_for_blocks(1)
    pid = pool_app.spy.pid(31)
    os.kill(pid, signal.SIGSTOP)
    try:
        final = stalled.final(timeout_s=STALL_S + 60)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:  # (replaced: killed by the pool)
            pass
    assert f"sent nothing for {STALL_S:.0f} s and was replaced" in final[2], final[2]
    pool_app.wait_for_workers()
    assert Visitor(pool_app, 32, 2).start().final()[2].startswith("Done.")


def test_a_closed_page_frees_its_worker_within_a_block(pool_app):
    """Gradio closes the handler's generator when the page goes away: the worker stops after its current block
    and takes the next visitor, long before the other stream ends."""
    from demo.streaming import stream_video
    from serving.jobs import StreamJob

    pool_app.wait_for_workers()
    other = Visitor(pool_app, 61, 12).start()
    session = pool_app.runtime.new_session()
    session.request_sent()
    closing = stream_video(pool_app.runtime, session, StreamJob(prompt=PROMPT, seed=62, num_blocks=12))
    blocks = 0
    while blocks < 2:
        blocks += isinstance(next(closing)[0], str)
    closing.close()  # (what Gradio does when the connection is lost)
    session.request_done()
    closed_at = time.monotonic()
    successor = Visitor(pool_app, 63, 1).start()
    assert successor.final()[2].startswith("Done.")
    assert pool_app.spy.started[63].worker == pool_app.spy.started[62].worker  # the freed worker took it
    assert successor.block_times()[0] - closed_at < 10  # (a tiny block takes about a second here)
    assert other.final()[2].startswith("Done.")
    assert successor.block_times()[0] < other.block_times()[-1]  # (while the other stream still ran)


def test_a_stop_while_waiting_drops_the_request(pool_app):
    pool_app.wait_for_workers()
    busy = [Visitor(pool_app, 41, 6).start(), Visitor(pool_app, 42, 6).start()]
    for visitor in busy:
        visitor.wait_for_blocks(1)
    waiting = Visitor(pool_app, 43, 2).start()
    deadline = time.monotonic() + 30
    while not any(s.startswith("Waiting") for s in waiting.statuses()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert waiting.handlers.request_stop(waiting.session) == "Stopped: the waiting request will not run."
    assert waiting.final()[2] == "Stopped before it started."
    assert 43 not in pool_app.spy.started
    for visitor in busy:
        assert visitor.final()[2].startswith("Done.")


def test_load_through_the_api_loses_nothing(pool_app):
    """8 API clients x 2 runs each at once: every run completes with its video; closed sessions leave no folder."""
    from gradio_client import Client

    pool_app.wait_for_workers()
    sessions = pool_app.store.sessions
    before = set(sessions.glob("sf-session-*"))
    results: list[tuple] = []
    errors: list[BaseException] = []

    def client_runs(index: int) -> None:
        try:
            client = Client(pool_app.url, verbose=False)
            for run in range(2):
                results.append(client.predict(PROMPT, "", 100 * index + run, False, 1, 16, "96x64", False, "", "none",
                                              1.0, False, False, api_name="/text_to_video"))
            client.close()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=client_runs, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not errors, errors[:2]
    assert len(results) == 16 and all(r[2].startswith("Done.") for r in results), [r[2] for r in results]
    assert all(Path(r[3]).is_file() for r in results)
    assert pool_app.runtime.queue_length() == 0
    deadline = time.monotonic() + 60
    while left := [d for d in set(sessions.glob("sf-session-*")) - before if list(d.glob("run*"))]:
        assert time.monotonic() < deadline, f"{len(left)} closed sessions' folders are still there"
        time.sleep(1)


def test_loras_fast_decoding_redecoding_extension_and_continuous_runs_work_on_workers(pool_app):
    import numpy as np

    from demo.streaming import redecode_with_vae
    from pipelines.loading.media import read_video
    from pipelines.run_record import read_record

    pool_app.wait_for_workers()
    info = pool_app.runtime.info
    assert info.lora_names == ["strong.safetensors"] and info.fast_decoder and info.extender
    plain, tuned = Visitor(pool_app, 51, 2).start(), Visitor(pool_app, 51, 2, lora="strong.safetensors").start()
    plain_video, tuned_video = (np.stack(read_video(v.final()[3])).astype(float) for v in (plain, tuned))
    assert np.abs(plain_video - tuned_video).mean() > 5  # the LoRA chosen on the page changes the worker's video
    record = read_record(tuned.session.output_dir / "run001" / "run.json")  # (written by the worker, stored here)
    assert record["loras"][0]["name"] == "strong.safetensors" and len(record["blocks"]) == 2
    # A branch of that run: its kept blocks travel to a worker, its LoRA goes on.
    branched = list(tuned.handlers.branch(1, 2, "a green square moves up on a black background", "recache", False,
                                          None, 16, tuned.session, None))
    assert branched[-1][2].startswith("Done.") and "branch from block 2" in branched[-1][2]
    record = read_record(tuned.session.output_dir / "run002" / "run.json")
    assert record["branch_block"] == 1 and record["loras"][0]["name"] == "strong.safetensors"

    fast = Visitor(pool_app, 52, 2, fast_decode=True).start()
    assert "fast TAEHV decoder" in fast.final()[2]
    path, status = redecode_with_vae(pool_app.runtime, fast.session)  # the latents went to a worker and back
    assert status == "Re-decoded with the full Wan VAE: 21 frames." and len(read_video(path)) == 21

    extended = Visitor(pool_app, 53, 1, extend=True).start()
    assert extended.final()[2].startswith("Done.")
    [box] = [update[5] for _, update in extended.updates if isinstance(update[5], str)]
    assert box and box != PROMPT and extended.session.extended_from["t2v"] == PROMPT

    endless = Visitor(pool_app, 54, 1, continuous=True).start()
    endless.wait_for_blocks(3)
    assert endless.handlers.request_stop(endless.session) == "Stopping after the current block …"
    assert endless.final()[2].startswith("Stopped.")


def test_the_camera_reaches_the_worker_for_video_to_video_and_pose(pool_app):
    """Live input in pool mode: the visitor's camera frames travel to the worker through the control board, for
    restyling and for driving the pose animation, and the run ends when the camera does."""
    from pipelines.loading.media import read_video
    from pipelines.video_input import LiveFrames
    from training.synthetic import SyntheticWorld, render

    from conftest import ROOT

    pool_app.wait_for_workers()

    def camera(frames) -> LiveFrames:
        feed = LiveFrames()

        def send() -> None:
            for frame in frames:
                feed.push(frame)
                time.sleep(1 / 16)
            feed.close()

        threading.Thread(target=send, daemon=True).start()
        return feed

    world = render(SyntheticWorld(0, frames=33).held_out_scene(0, size=(64, 96)))
    restyled = Visitor(pool_app, 61, 1, OTHER, tab="v2v", strength=0.5, continuous=True,
                       camera=camera(list(world) * 2)).start()
    example = ROOT / "assets/examples/shapes/pose/an_orange_stick_figure_dances_on_a_dark_blue_background"
    posed = Visitor(pool_app, 62, 1, "an orange stick figure dances", tab="pose", continuous=True,
                    reference=example.with_suffix(".png").read_bytes(), is_pose_video=True,
                    camera=camera(read_video(example.with_suffix(".mp4")))).start()
    for visitor in (restyled, posed):
        visitor.wait_for_blocks(2)
        status = visitor.final()[2]  # (a continuous run that ends before its cap says Stopped)
        assert visitor.error is None and status.startswith("Stopped.") and " frames" in status, status


def test_pool_mode_refuses_server_wide_changes_with_a_reason(pool_app):
    with pytest.raises(PermissionError, match="not offered in pool mode"):
        pool_app.runtime.set_memory_profile("low", "any token")
    with pytest.raises(PermissionError, match="not offered in pool mode"):
        pool_app.runtime.switch_model("tiny", "any token")
    assert "**pool:** 2 workers" in pool_app.runtime.banner()
    metrics = _metrics(pool_app)
    assert "sf_live_workers 2.0" in metrics and "sf_queue_wait_seconds_bucket" in metrics
    assert "sf_worker_busy_seconds_total{worker=" in metrics


def _metrics(app: PoolApp) -> str:
    import urllib.request

    with urllib.request.urlopen(app.url + "metrics", timeout=10) as response:
        return response.read().decode()


CHROMIUM = os.environ.get("CHROMIUM_PATH", shutil.which("chromium") or "/usr/bin/chromium")


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}")
def test_the_pool_app_streams_in_all_three_tabs_in_a_browser(pool_app):
    from playwright.sync_api import sync_playwright
    from test_browser import CHROMIUM_ARGS, pick_example, tab_panel

    pool_app.wait_for_workers()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(pool_app.url, wait_until="domcontentloaded")
        page.wait_for_selector("#banner", timeout=60_000)
        assert "pool:" in page.locator("#banner").inner_text()
        for tab, name in (("t2v", "Text to Video"), ("i2v", "Image to Video"), ("pose", "Pose Animation")):
            page.get_by_role("tab", name=name).click()
            panel = tab_panel(page, tab)
            if tab == "t2v":
                panel.get_by_label("Prompt").first.fill(PROMPT)
            else:
                pick_example(page, tab)
            blocks = panel.get_by_label("Blocks", exact=False).first
            blocks.fill("2")
            blocks.press("Tab")
            panel.get_by_role("button", name="Generate").first.click()
            deadline = time.monotonic() + 120
            while not page.locator(f"#status-{tab}").inner_text().startswith("Done."):
                status = page.locator(f"#status-{tab}").inner_text()
                assert time.monotonic() < deadline and "Not started" not in status, status
                time.sleep(0.2)
            assert page.locator(f"#download-{tab} a").count() >= 1  # the mp4 to download
        browser.close()
