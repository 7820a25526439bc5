"""The app in a real headless Chromium: live preview updates while streaming, and Stop."""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import ROOT

CHROMIUM = os.environ.get("CHROMIUM_PATH", shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
# Set SF_SCREENSHOT_PATH=assets/screenshot.png to refresh the README screenshot.
SCREENSHOT = Path(os.environ.get("SF_SCREENSHOT_PATH", "/tmp/sf-app-mid-stream.png"))

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}")]


@pytest.fixture(scope="module")
def page(app_server, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.goto(app_server.url, wait_until="domcontentloaded")
        page.wait_for_selector("#banner", timeout=60_000)
        yield page
        browser.close()


def _status(page, tab: str = "t2v") -> str:
    return page.locator(f"#status-{tab}").inner_text()


def _set_blocks(page, value: int) -> None:
    box = page.get_by_label("Blocks", exact=False).first
    box.fill(str(value))
    box.press("Enter")


def _preview_src(page) -> str | None:
    image = page.locator("#preview-t2v img").first
    return image.get_attribute("src") if image.count() else None


def test_preview_updates_block_by_block_while_streaming(page):
    assert "Tiny Wan trained on synthetic shapes" in page.locator("#banner").inner_text()
    page.get_by_label("Prompt").first.fill("a red circle moves to the right on a dark blue background")
    _set_blocks(page, 6)
    page.get_by_role("button", name="Generate").first.click()
    seen: list[str] = []
    statuses: set[str] = set()
    deadline = time.monotonic() + 90
    screenshot_taken = False
    while time.monotonic() < deadline:
        src = _preview_src(page)
        if src and (not seen or seen[-1] != src):
            seen.append(src)
        status = _status(page)
        statuses.add(status)
        if not screenshot_taken and "Block 3/6" in status:
            page.screenshot(path=str(SCREENSHOT))
            screenshot_taken = True
        if status.startswith("Done."):
            break
        time.sleep(0.05)
    assert _status(page).startswith("Done."), statuses
    distinct_before_end = len(set(seen))
    assert distinct_before_end >= 3, f"preview changed only {distinct_before_end} times: streaming not visible"
    assert sum("Block" in s and "/6" in s and not s.startswith("Done") for s in statuses) >= 2
    assert page.locator("#download-t2v a").count() >= 1 or "video.mp4" in page.locator("#download-t2v").inner_text()
    # The drift plot under the video has the run's blocks.
    page.wait_for_function("document.querySelector('#drift-t2v canvas, #drift-t2v svg') !== null", timeout=15_000)
    # Both times to the first frame are reported: the server's in the status, the browser's beside it.
    assert "(server)" in _status(page)
    # (the page reports its own time in a request of its own, after the run's last update)
    page.wait_for_function("document.querySelector('#browser-timing-t2v').innerText.includes('after the click')",
                           timeout=15_000)
    timing = page.locator("#browser-timing-t2v").inner_text()
    assert "First frame on screen" in timing and "after the click" in timing, timing
    seconds = float(timing.split("screen")[1].split("s after")[0])
    server_seconds = float(_status(page).split("first frame after")[1].split("s (server)")[0])
    assert seconds >= server_seconds > 0


def test_enter_in_the_prompt_generates(page):
    _set_blocks(page, 1)
    prompt = page.get_by_label("Prompt").first
    prompt.fill("a lantern")
    prompt.press("Enter")
    deadline = time.monotonic() + 60
    while not (_status(page).startswith("Done.") and "Block 1/1" in _status(page)):  # (not the previous run's)
        assert time.monotonic() < deadline, _status(page)
        time.sleep(0.1)
    assert prompt.input_value() == "a lantern"


def _switch_mid_stream(page, first: str, second: str, switch) -> str:
    """Generates 8 blocks under `first`, calls switch(prompt box) with `second` typed in at block 2,
    waits for the run to finish and returns the prompt timeline."""
    _set_blocks(page, 8)
    prompt = page.get_by_label("Prompt").first
    prompt.fill(first)
    page.get_by_role("button", name="Generate").first.click()
    deadline = time.monotonic() + 60
    while "Block 2/8" not in _status(page):
        assert time.monotonic() < deadline, _status(page)
        time.sleep(0.05)
    prompt.fill(second)
    switch(prompt)
    deadline = time.monotonic() + 90
    while not (_status(page).startswith("Done.") and "Block 8/8" in _status(page)):
        assert time.monotonic() < deadline, _status(page)
        time.sleep(0.1)
    return page.locator("#timeline-t2v").inner_text()


def test_apply_switches_the_prompt_mid_stream_and_the_timeline_shows_it(page):
    apply = page.get_by_role("button", name="Apply new prompt").first
    timeline = _switch_mid_stream(page, "a paper boat", "a burning candle", lambda prompt: apply.click())
    assert "a paper boat" in timeline and "a burning candle" in timeline and "switch took" in timeline, timeline


def test_enter_while_streaming_applies_the_prompt_instead_of_queueing_a_run(page):
    timeline = _switch_mid_stream(page, "a glass marble", "a spinning top", lambda prompt: prompt.press("Enter"))
    assert "a glass marble" in timeline and "a spinning top" in timeline, timeline
    time.sleep(3)  # no second generation was queued by that Enter
    assert _status(page).startswith("Done.") and "Block 8/8" in _status(page), _status(page)


BUFFERS_JS = """() => { const video = document.querySelector('#live-stream-t2v video');
  const ranges = (window.sfSourceBuffers || []).filter((b) => { try { return b.buffered.length > 0; }
    catch (e) { return false; } }).map((b) => [b.buffered.start(0), b.buffered.end(b.buffered.length - 1)]);
  return {time: video ? video.currentTime : -1, ranges}; }"""


def test_live_player_drops_what_has_been_played_in_continuous_mode(page):
    from demo.ui import PLAYED_KEEP_S

    page.get_by_label("Continuous").first.check()
    try:
        page.get_by_label("Prompt").first.fill("a slow tide")
        page.get_by_role("button", name="Generate").first.click()
        deadline = time.monotonic() + 120
        state = page.evaluate(BUFFERS_JS)
        while state["time"] < PLAYED_KEEP_S + 5:
            assert time.monotonic() < deadline, state
            time.sleep(0.5)
            state = page.evaluate(BUFFERS_JS)
        time.sleep(2)  # a few more segments arrive and trigger the trim
        state = page.evaluate(BUFFERS_JS)
        assert state["ranges"], state
        for start, end in state["ranges"]:
            assert start > 1, state  # what was played more than PLAYED_KEEP_S ago is gone
            assert start >= state["time"] - PLAYED_KEEP_S - 3, state
    finally:
        page.get_by_role("button", name="Stop").first.click()
        deadline = time.monotonic() + 60
        while not _status(page).startswith(("Stopped", "Done")):
            assert time.monotonic() < deadline, _status(page)
            time.sleep(0.2)
        page.get_by_label("Continuous").first.uncheck()


def test_stop_while_idle_says_nothing_runs(page):
    deadline = time.monotonic() + 60
    while not _status(page).startswith(("Done.", "Stopped", "Ready")):
        assert time.monotonic() < deadline, _status(page)
        time.sleep(0.1)
    page.get_by_role("button", name="Stop").first.click()
    deadline = time.monotonic() + 10
    while _status(page) != "Nothing is running.":
        assert time.monotonic() < deadline, _status(page)
        time.sleep(0.1)


def test_a_refused_request_is_said_in_the_status_line_and_the_outputs_stay_calm(page):
    deadline = time.monotonic() + 60
    while _status(page).startswith(("Starting", "Block")):  # (an earlier test's run)
        assert time.monotonic() < deadline, _status(page)
        time.sleep(0.1)
    page.get_by_label("Prompt").first.fill("   ")
    page.get_by_role("button", name="Generate").first.click()
    deadline = time.monotonic() + 20
    while "Please enter a prompt." not in _status(page):
        assert time.monotonic() < deadline, _status(page)
        time.sleep(0.1)
    assert _status(page).startswith("Not started:")
    assert page.get_by_text("Error", exact=True).count() == 0  # no output marked, no error toast


def test_pose_tab_says_what_dwpose_needs_as_information(page):
    """The example (a rendered pose video) works without DWPose: its files are named, not warned about."""
    page.get_by_role("tab", name="Pose Animation").click()
    note = page.locator("#pose-note")
    assert "For driving videos of real people" in note.inner_text() and "--weights" in note.inner_text()
    assert "unavailable" not in note.inner_text() and not note.locator("strong").count()
    page.get_by_role("tab", name="Text to Video").click()


def test_stop_button_stops_the_run(page):
    _set_blocks(page, 12)
    page.get_by_label("Prompt").first.fill("a very long journey")
    page.get_by_role("button", name="Generate").first.click()
    deadline = time.monotonic() + 60
    while "Block 1/12" not in _status(page) and "Block 2/12" not in _status(page):
        assert time.monotonic() < deadline, _status(page)
        time.sleep(0.05)
    page.get_by_role("button", name="Stop").first.click()
    deadline = time.monotonic() + 60
    while not _status(page).startswith(("Stopped", "Done")):
        assert time.monotonic() < deadline, _status(page)
        time.sleep(0.1)
    assert _status(page).startswith("Stopped after block"), _status(page)


def test_stats_panel_shows_recent_runs_and_percentiles(page):
    page.get_by_text("Stats", exact=True).click()
    page.wait_for_function("document.querySelector('#stats') && document.querySelector('#stats').innerText.includes('p50')",
                           timeout=15_000)
    stats = page.locator("#stats").inner_text()
    assert "recent runs" in stats and "first frame on screen (browser)" in stats and "t2v" in stats


def _ended_status(page, before: str, says: str = "", tab: str = "t2v", seconds: float = 90) -> str:
    """The status line a request ended with: Done./Stopped saying `says`, or a refusal, and not `before` (the line
    shown before the request: an earlier run's end, or the end of a run this request stopped, would otherwise pass
    for this one's; while a request is under way the line begins with its timer)."""
    deadline = time.monotonic() + seconds
    while True:
        status = _status(page, tab)
        if status != before and (status.startswith("Not started")
                                 or status.startswith(("Done.", "Stopped")) and says in status):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


def _wait_for_upload(page, shown: str) -> None:
    """Waits until the page shows an upload as the component's value (`shown`: what appears then): the file goes
    to the server first, and a button pressed before that sends an empty component."""
    page.wait_for_selector(shown, state="attached", timeout=30_000)


def test_a_run_record_uploaded_on_the_page_replays_the_run(page):
    sessions = Path(os.environ["SF_OUTPUTS_DIR"]) / "sessions"  # (conftest: the tests' own outputs folder)
    records = sorted(sessions.glob("server-*/sf-session-*/run*/run.json"), key=lambda p: p.stat().st_mtime)
    assert records, "an earlier test's run wrote no record"
    page.get_by_text("Replay a run record", exact=True).click()
    page.locator("#replay-record input[type=file]").set_input_files(str(records[-1]))
    _wait_for_upload(page, "#replay-record .file-preview")
    before = _status(page)
    page.locator("#replay-button").click()
    status = _ended_status(page, before, says="replaying a run record")
    assert status.startswith(("Done.", "Stopped after block")), status


def test_branch_from_a_block_of_the_streaming_run_and_see_both_in_the_tree(page):
    page.get_by_label("Prompt").first.fill("a red circle moves to the right on a dark blue background")
    _set_blocks(page, 8)
    page.get_by_text("Branch: go back to a block and continue differently", exact=True).first.click()
    earlier = page.locator("#branch-run-t2v input").first.input_value()  # (an earlier test's run, or empty)
    page.get_by_role("button", name="Generate").first.click()
    deadline = time.monotonic() + 60
    while "Block 3/8" not in _status(page):
        assert time.monotonic() < deadline and not _status(page).startswith("Done"), _status(page)
        time.sleep(0.05)
    # (the new run reaches the panel in two requests after its first block: the run menu, then the run's slider
    # range, frame and tree; a block picked before the second answer arrives would be overwritten by it, as it
    # would be for a person on a busy server; the new run's number is in no earlier tree)
    menu = page.locator("#branch-run-t2v input").first
    deadline = time.monotonic() + 30
    while (run := menu.input_value()) == earlier:
        assert time.monotonic() < deadline, run
        time.sleep(0.05)
    assert run.startswith("run ") and "red circle" in run, run
    page.wait_for_function("run => document.querySelector('#branch-tree-t2v').innerText.includes(run + ':')",
                           arg=run.split(":")[0], timeout=30_000)
    block = page.locator("#branch-block-t2v input[type=number]").first
    block.fill("3")
    block.press("Enter")
    page.wait_for_function("document.querySelector('#branch-frame-t2v img') !== null", timeout=15_000)
    page.locator("#branch-prompt-t2v textarea").first.fill("a green square moves up on a black background")
    before = _status(page)
    page.locator("#branch-button-t2v").first.click()
    status = _ended_status(page, before, says="branch from block 3")
    assert status.startswith("Done.") and "branch from block 3" in status, status
    assert "Block 8/8" in status  # (the branch has the whole length: 2 kept blocks and 6 new ones)
    parent = run.split(":")[0]
    tree = page.locator("#branch-tree-t2v").inner_text()
    assert parent in tree and f"← {parent} at block 3: a green square" in tree, tree
    assert page.locator("#branch-run-t2v input").first.input_value().startswith(f"run {int(parent[4:]) + 1} ← {parent}")


def test_video_to_video_tab_restyles_an_uploaded_video_and_refuses_a_broken_one(page, tmp_path):
    from pipelines.loading.video_io import write_video
    from training.synthetic import SyntheticWorld, render

    scene = SyntheticWorld(0, frames=33).held_out_scene(0, size=(64, 96))
    video, broken = tmp_path / "input.mp4", tmp_path / "broken.mp4"
    write_video(video, [render(scene)], 16)
    broken.write_bytes(b"not a video" * 100)
    page.get_by_role("tab", name="Video to Video").click()
    upload = page.locator("#v2v-input input[type=file]")
    upload.set_input_files(str(broken))
    _wait_for_upload(page, "#v2v-input button[aria-label='Clear']")
    page.locator("#prompt-v2v textarea").fill("a green square moves up on a black background")
    generate = page.locator("#generate-v2v")
    before = _status(page, "v2v")
    generate.click()
    status = _ended_status(page, before, tab="v2v", seconds=60)
    assert "Could not read the upload as a video" in status, status
    page.locator("#v2v-input button[aria-label='Clear']").first.click()
    page.locator("#v2v-input input[type=file]").set_input_files(str(video))
    _wait_for_upload(page, "#v2v-input video")
    before = _status(page, "v2v")
    generate.click()
    status = _ended_status(page, before, tab="v2v")
    assert status.startswith("Done. Block"), status
    page.get_by_role("tab", name="Text to Video").click()


def tab_panel(page, tab: str):
    """The tab's panel (its inputs and outputs), found from its status line."""
    return page.locator(f"#status-{tab}").locator("xpath=ancestor::div[contains(@class,'tabitem')]").first


def pick_example(page, tab: str) -> None:
    """Clicks the tab's first example and waits until its prompt is in the prompt box: the example's files come in
    the same answer, and Generate pressed before it would send an empty form."""
    tab_panel(page, tab).locator(".gallery-item, tr.tr-body, button.gallery-item").first.click()
    page.wait_for_function("tab => document.querySelector(`#prompt-${tab} textarea`).value !== ''", arg=tab,
                           timeout=30_000)


def _live_run_until_stop(page, tab: str, timeout_s: float = 120) -> None:
    """Generate in `tab` with its camera: blocks keep coming (three different frame counts in the status), then Stop
    ends the run."""
    page.locator(f"#generate-{tab}").click()
    deadline = time.monotonic() + timeout_s
    made = set()
    while len(made) < 3:
        status = _status(page, tab)
        assert time.monotonic() < deadline and not status.startswith(("Done", "**", "Stopped", "Not")), status
        made.update(re.findall(r"(\d+) frames", status))
        time.sleep(0.1)
    page.locator(f"#stop-{tab}").click()
    deadline = time.monotonic() + 30
    while not _status(page, tab).startswith("Stopped."):
        assert time.monotonic() < deadline, _status(page, tab)
        time.sleep(0.1)


def _open_tab(browser, url: str, tab: str, camera: bool):
    """A new page of the app in `browser`, on `tab`, with or without permission to use the camera."""
    page = browser.new_context(viewport={"width": 1400, "height": 1000},
                               permissions=["camera"] if camera else []).new_page()
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#banner", timeout=60_000)
    page.get_by_role("tab", name=tab).click()
    return page


def _camera_browser(page, video: Path, folder: Path):
    """A Chromium whose fake camera plays `video` (converted to the .y4m it reads), camera permission granted."""
    import subprocess

    import imageio_ffmpeg

    feed = folder / f"{video.stem}.y4m"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-i", str(video), "-pix_fmt",
                    "yuv420p", str(feed)], check=True)
    return page.context.browser.browser_type.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS + [
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-video-capture={feed}"])


def test_the_camera_drives_video_to_video_live_until_stop(page, app_server, tmp_path):
    """A fake camera that plays the synthetic world (a .y4m file) streams into the Video to Video tab; the run
    restyles it block by block and stops with Stop."""
    from pipelines.loading.video_io import write_video
    from training.synthetic import SyntheticWorld, render

    world = tmp_path / "world.mp4"
    write_video(world, [render(SyntheticWorld(0, frames=33).held_out_scene(0, size=(64, 96)))], 16)
    browser = _camera_browser(page, world, tmp_path)
    try:
        page = _open_tab(browser, app_server.url, "Video to Video", camera=True)
        page.locator("#v2v-camera").get_by_text("Click to Access Webcam").click()
        page.locator("#v2v-camera button[aria-label='capture photo']").click()  # (starts the camera's stream)
        page.locator("#v2v-use-camera input").check()
        page.locator("#prompt-v2v textarea").fill("a green square moves up on a black background")
        _live_run_until_stop(page, "v2v")
    finally:
        browser.close()


def test_a_camera_the_page_may_not_use_gives_one_message(page, app_server):
    """Camera permission denied (no fake device, no permission): the live run says what to do, and the page and the
    server go on (a text-to-video run afterwards works)."""
    browser = page.context.browser.browser_type.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    try:
        page = _open_tab(browser, app_server.url, "Video to Video", camera=False)
        page.locator("#v2v-camera").get_by_text("Click to Access Webcam").click()  # (denied: nothing streams)
        page.locator("#v2v-use-camera input").check()
        page.locator("#prompt-v2v textarea").fill("a green square moves up on a black background")
        page.locator("#generate-v2v").click()
        deadline = time.monotonic() + 60
        while "No frames came from the camera" not in _status(page, "v2v"):
            assert time.monotonic() < deadline, _status(page, "v2v")
            time.sleep(0.2)
        assert "Allow this page to use it" in _status(page, "v2v")
        page.get_by_role("tab", name="Text to Video").click()
        _set_blocks(page, 1)
        page.get_by_label("Prompt").first.fill("a red circle moves to the right on a dark blue background")
        page.get_by_role("button", name="Generate").first.click()
        deadline = time.monotonic() + 60
        while not _status(page).startswith("Done."):
            assert time.monotonic() < deadline and "Not started" not in _status(page), _status(page)
            time.sleep(0.2)
    finally:
        browser.close()


def test_the_camera_drives_the_pose_animation_live_until_stop(page, app_server, tmp_path):
    """A fake camera that shows a dancing stick figure (the pose example as a .y4m file) drives the Pose Animation
    tab as a rendered pose video: blocks keep coming while it sends, and Stop ends the run."""
    example = ROOT / "assets/examples/shapes/pose/an_orange_stick_figure_dances_on_a_dark_blue_background.mp4"
    browser = _camera_browser(page, example, tmp_path)
    try:
        page = _open_tab(browser, app_server.url, "Pose Animation", camera=True)
        pick_example(page, "pose")  # the character, ticked as a pose
        page.locator("#pose-camera").get_by_text("Click to Access Webcam").click()
        page.locator("#pose-camera button[aria-label='capture photo']").click()  # (starts the camera's stream)
        page.locator("#pose-use-camera input").check()
        _live_run_until_stop(page, "pose")
    finally:
        browser.close()


def test_closing_the_tab_removes_the_session_folder(page, app_server):
    sessions = Path(os.environ["SF_OUTPUTS_DIR"]) / "sessions"  # (conftest: the tests' own outputs folder)
    before = set(sessions.glob("server-*/sf-session-*"))
    context = page.context.browser.new_context()
    tab = context.new_page()
    tab.goto(app_server.url, wait_until="domcontentloaded")
    tab.wait_for_selector("#banner", timeout=60_000)
    _set_blocks(tab, 1)
    tab.get_by_label("Prompt").first.fill("a short visit")
    tab.get_by_role("button", name="Generate").first.click()
    deadline = time.monotonic() + 60
    while not _status(tab).startswith("Done."):
        assert time.monotonic() < deadline, _status(tab)
        time.sleep(0.1)
    mine = [d for d in set(sessions.glob("server-*/sf-session-*")) - before if list(d.glob("run*/video.mp4"))]
    assert len(mine) == 1
    context.close()
    deadline = time.monotonic() + 120
    while mine[0].exists():
        assert time.monotonic() < deadline, "the closed session's folder is still there"
        time.sleep(1)
