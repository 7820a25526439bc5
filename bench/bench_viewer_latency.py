"""Movement to restyled frame as a viewer sees it: camera -> upload -> video-to-video -> stream -> screen.

Runs the app in this process (so the camera path can be timed on the server) and drives its Video to
Video tab in headless Chromium, whose camera is replaced by a canvas (getUserMedia returns its
captureStream): a red square on a dark blue background that jumps between the left and the right
every `--period` seconds, with the capture time (Date.now()) written into each frame as 32 black or
white cells. The page watches what it shows, the latest-frame image and the live stream's player,
and notes when the square reaches the side it jumped to. Per movement:

  upload      a frame's capture to its arrival in the server's camera handler (the stamp in its pixels)
  on screen   the movement to the first displayed frame with the square on its new side, in the
              latest-frame image and in the live stream's video player (HLS segments, its buffering)
  delivery    a block's encoding on the server to its frames on screen (each change of the side shown,
              from the last block encoded before it): what the page adds after the server's part

    python bench/bench_viewer_latency.py --out bench/results/cpu_viewer_latency.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # (the browser tests import their conftest)

from tests.app_server import free_port, serve_in_thread  # noqa: E402
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

STAMP_BITS, CELL = 32, 20  # the capture time's low 32 bits of milliseconds, as 2 rows of 16 cells of 20 px
WIDTH, HEIGHT = 320, 240

# The stamp read_stamp reads: the capture time's bits as black or white cells at the frame's top left.
STAMP_JS = """
  function sfStamp(ctx, now) {
    const stamp = now %% 4294967296;
    for (let bit = 0; bit < %(bits)d; bit++) {
      ctx.fillStyle = (Math.floor(stamp / 2 ** bit) %% 2) ? '#fff' : '#000';
      ctx.fillRect((bit %% 16) * %(cell)d, Math.floor(bit / 16) * %(cell)d, %(cell)d, %(cell)d);
    }
  }""" % dict(bits=STAMP_BITS, cell=CELL)

# The camera: a canvas stream. Frames are drawn at 30 fps with their capture time; the square's side flips every
# period, and each flip's time is kept in window.sfMoves.
CANVAS_CAMERA = """
(() => {
  const period = %(period)d;
  const canvas = document.createElement('canvas'); canvas.width = %(width)d; canvas.height = %(height)d;
  const ctx = canvas.getContext('2d');%(stamp)s
  window.sfMoves = []; window.sfSeen = {image: [], video: []};
  let side = 'left', flipped = Date.now();
  function draw() {
    const now = Date.now();
    if (now - flipped >= period) { side = side === 'left' ? 'right' : 'left'; flipped = now;
                                   window.sfMoves.push([now, side]); }
    ctx.fillStyle = 'rgb(10,10,70)'; ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.fillStyle = 'rgb(230,30,30)';
    const size = canvas.height / 2;
    ctx.fillRect(side === 'left' ? canvas.width * 0.08 : canvas.width * 0.92 - size, canvas.height * 0.35, size, size);
    sfStamp(ctx, now);
  }
  setInterval(draw, 33); draw();
  const stream = canvas.captureStream(30);
  navigator.mediaDevices.getUserMedia = async () => stream;
  // What the page shows: the side of the red square in the latest-frame image and in the stream's player.
  const probe = document.createElement('canvas'); const pctx = probe.getContext('2d', {willReadFrequently: true});
  function sideOf(source, w, h) {
    if (!w || !h) return null;
    probe.width = w; probe.height = h; pctx.drawImage(source, 0, 0, w, h);
    const data = pctx.getImageData(0, Math.floor(h * 0.3), w, Math.floor(h * 0.7)).data;
    let sum = 0, count = 0;
    for (let i = 0; i < data.length; i += 4) {
      if (data[i] > 120 && data[i] > data[i + 1] + 60 && data[i] > data[i + 2] + 60) {
        sum += (i / 4) %% w; count++; }
    }
    return count < 4 ? null : (sum / count < w / 2 ? 'left' : 'right');
  }
  const last = {image: null, video: null};
  setInterval(() => {
    const img = document.querySelector('#preview-v2v img');
    const video = document.querySelector('#live-stream-v2v video');
    const seen = {image: img && img.complete ? sideOf(img, img.naturalWidth, img.naturalHeight) : null,
                  video: video && video.readyState >= 2 ? sideOf(video, video.videoWidth, video.videoHeight) : null};
    for (const key of ['image', 'video']) {
      if (seen[key] && seen[key] !== last[key]) { window.sfSeen[key].push([Date.now(), seen[key]]); last[key] = seen[key]; }
    }
  }, 10);
})();
"""


def read_stamp(frame: np.ndarray, mirrored: bool) -> int:
    """The capture time (ms, low 32 bits) written into a camera frame (read from the right when the page mirrored
    the camera, as Gradio's webcam does by default)."""
    gray = frame[..., :3].mean(axis=2)
    if mirrored:
        gray = gray[:, ::-1]
    bits = [gray[(bit // 16) * CELL + CELL // 2, (bit % 16) * CELL + CELL // 2] > 128 for bit in range(STAMP_BITS)]
    return sum(1 << bit for bit, on in enumerate(bits) if on)


def upload_delay(frame: np.ndarray) -> tuple[float, bool] | None:
    """(seconds from the frame's capture to now, whether it arrived mirrored), from its stamp."""
    now = int(time.time() * 1e3) % 2**32
    for mirrored in (False, True):
        delay = ((now - read_stamp(frame, mirrored)) % 2**32) / 1e3
        if delay < 60:
            return delay, mirrored
    return None


def delays(moves: list, seen: list) -> list[float]:
    """Seconds from each movement to the first shown frame with the square on the movement's side."""
    out = []
    for (moved, side), following in zip(moves, moves[1:] + [[float("inf"), None]]):
        shown = next((t for t, s in seen if moved <= t < following[0] and s == side), None)
        if shown is not None:
            out.append((shown - moved) / 1e3)
    return out


def delivery(encoded: list[float], seen: list) -> list[float]:
    """Seconds from the last block encoded before each change shown to that change on screen."""
    out = []
    for shown, _ in seen:
        ready = [t for t in encoded if t <= shown]
        if ready:
            out.append((shown - ready[-1]) / 1e3)
    return out


def summary(values: list[float]) -> dict:
    return {"median_s": round(statistics.median(values), 3), "worst_s": round(max(values), 3),
            "count": len(values)} if values else {"count": 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="how long the live run lasts")
    parser.add_argument("--period", type=float, default=5.0,
                        help="seconds between the square's jumps (longer than the slowest delay)")
    parser.add_argument("--strength", type=float, default=0.3)
    parser.add_argument("--app-args", default="", help="app options, e.g. '--config configs/tiny.yaml'")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import shlex
    import shutil
    import tempfile

    from playwright.sync_api import sync_playwright

    from app import build_parser, make_server
    from demo.outputs import OutputStore
    from demo.runtime import load_runtime
    from demo.session import SessionControl
    from demo.ui import build_demo
    from serving.encoding import BlockEncoder

    uploads, mirrored = [], set()  # seconds from capture to the server's camera handler; whether frames came mirrored
    plain = SessionControl.camera_frame

    def timed(self, frame) -> None:
        if frame is not None and frame.shape[0] >= 2 * CELL and (delay := upload_delay(frame)) is not None:
            uploads.append(delay[0])
            mirrored.add(delay[1])
        plain(self, frame)

    SessionControl.camera_frame = timed
    encoded = []  # wall-clock ms when each block's segment was ready to send
    plain_encode = BlockEncoder.encode

    def timed_encode(self, *args, **kwargs):
        out = plain_encode(self, *args, **kwargs)
        encoded.append(time.time() * 1e3)
        return out

    BlockEncoder.encode = timed_encode
    options = build_parser().parse_args(shlex.split(args.app_args))
    folder = Path(tempfile.mkdtemp(prefix="sf-viewer-"))
    store = OutputStore(folder, int(2e9))
    runtime = load_runtime(options.config, options.weights, options.device, compile_models=options.compile,
                           outputs=store)
    demo = build_demo(runtime)
    demo.queue(max_size=32, default_concurrency_limit=1)
    port = free_port()
    server = make_server(demo, runtime, "127.0.0.1", port, [str(store.sessions)])
    serving = serve_in_thread(server)

    script = CANVAS_CAMERA % dict(period=int(args.period * 1e3), width=WIDTH, height=HEIGHT, stamp=STAMP_JS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS + [
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", "--autoplay-policy=no-user-gesture-required"])
        page = browser.new_context(viewport={"width": 1400, "height": 1000}, permissions=["camera"]).new_page()
        page.add_init_script(script)
        page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
        page.wait_for_selector("#banner", timeout=120_000)
        page.get_by_role("tab", name="Video to Video").click()
        page.locator("#v2v-camera").get_by_text("Click to Access Webcam").click()
        page.locator("#v2v-camera button[aria-label='capture photo']").click()  # (starts the camera's stream)
        page.locator("#v2v-use-camera input").check()
        strength = page.locator("input[aria-label='number input for Strength']").first
        strength.fill(str(args.strength))
        strength.press("Enter")
        page.locator("#prompt-v2v textarea").fill("a red square on a dark blue background")
        page.locator("#generate-v2v").click()
        time.sleep(args.seconds)
        moves, seen = page.evaluate("[window.sfMoves, window.sfSeen]")
        page.locator("#stop-v2v").click()
        status = page.locator("#status-v2v").inner_text()
        browser.close()
    server.should_exit = True
    serving.join(timeout=30)
    runtime.outputs.remove_sessions()
    shutil.rmtree(folder, ignore_errors=True)

    if mirrored == {True}:  # the server received (and so restyled) the camera mirrored: the square's sides swap
        moves = [[t, "right" if side == "left" else "left"] for t, side in moves]
    first_seen = min((t for t, _ in seen["image"]), default=None)
    moves = [m for m in moves if first_seen is not None and m[0] > first_seen]  # once frames show at all
    result = {
        "command": "python bench/bench_viewer_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs", "app_args": args.app_args,
        "strength": args.strength, "period_s": args.period, "seconds": args.seconds, "status": status,
        "camera_mirrored": sorted(mirrored),
        "upload": summary(uploads),
        "on_screen_latest_frame": summary(delays(moves, seen["image"])),
        "on_screen_stream_player": summary(delays(moves, seen["video"])),
        "delivery_latest_frame": summary(delivery(encoded, seen["image"])),
        "delivery_stream_player": summary(delivery(encoded, seen["video"])),
        "movements": len(moves),
        "trace": {"moves": moves, "seen": seen},  # page clock (ms): the jumps, and each change of the side shown
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
