"""Camera frames from the browser to the server: Gradio's streaming webcam input against WebRTC (aiortc).

Headless Chromium's camera is replaced by a canvas stream whose frames carry their capture time
(Date.now(), 32 black or white cells, as in bench_viewer_latency.py). Each transport gets the same
stream for `--seconds` with no model running, and the server reads each arriving frame's stamp:
  gradio  a gr.Image(sources=["webcam"], streaming=True, type="numpy") with .stream(stream_every=1/16),
          the app's own camera input
  webrtc  an RTCPeerConnection to an aiortc peer behind a route of a FastAPI server (offer/answer over
          HTTP), frames decoded to RGB arrays there

    pip install aiortc   # (the benchmark's own dependency; the app does not use it)
    python bench/bench_camera_transport.py --out bench/results/cpu_camera_transport.json
"""
from __future__ import annotations

import argparse
import asyncio
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

from bench.bench_viewer_latency import STAMP_JS, upload_delay  # noqa: E402
from tests.app_server import free_port, serve_in_thread  # noqa: E402
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

CANVAS = """
(() => {
  const canvas = document.createElement('canvas'); canvas.width = %(width)d; canvas.height = %(height)d;
  const ctx = canvas.getContext('2d');%(stamp)s
  function draw() {
    ctx.fillStyle = 'rgb(10,10,70)'; ctx.fillRect(0, 0, canvas.width, canvas.height);
    sfStamp(ctx, Date.now());
  }
  setInterval(draw, 33); draw();
  window.sfStream = canvas.captureStream(30);
  navigator.mediaDevices.getUserMedia = async () => window.sfStream;
})();
"""

WEBRTC_PAGE = """<!doctype html><html><body><script>
async function start() {
  const pc = new RTCPeerConnection();
  window.sfStream.getTracks().forEach(track => pc.addTrack(track, window.sfStream));
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise(done => { if (pc.iceGatheringState === 'complete') done();
    else pc.addEventListener('icegatheringstatechange', () => pc.iceGatheringState === 'complete' && done()); });
  const answer = await (await fetch('/offer', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({sdp: pc.localDescription.sdp, type: pc.localDescription.type})})).json();
  await pc.setRemoteDescription(answer);
  window.sfPeer = pc;
}
start();
</script></body></html>"""


def serve(app, port: int):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    return server, serve_in_thread(server)


def gradio_app(delays: list[float]):
    import gradio as gr
    from fastapi import FastAPI

    def frame(image) -> None:
        if image is not None and (delay := upload_delay(image)) is not None:
            delays.append(delay[0])

    with gr.Blocks() as blocks:
        camera = gr.Image(sources=["webcam"], streaming=True, type="numpy", elem_id="camera")
        camera.stream(frame, inputs=[camera], outputs=None, stream_every=1 / 16, concurrency_limit=None,
                      show_progress="hidden")  # (as the app streams its camera)
    return gr.mount_gradio_app(FastAPI(), blocks, path="/")


def webrtc_app(delays: list[float]):
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse

    app, peers = FastAPI(), []

    @app.get("/")
    def page() -> HTMLResponse:
        return HTMLResponse(WEBRTC_PAGE)

    @app.post("/offer")
    async def offer(body: dict) -> dict:
        peer = RTCPeerConnection()
        peers.append(peer)

        @peer.on("track")
        def on_track(track) -> None:
            async def receive() -> None:
                while True:
                    image = (await track.recv()).to_ndarray(format="rgb24")
                    if (delay := upload_delay(image)) is not None:
                        delays.append(delay[0])
            asyncio.ensure_future(receive())

        await peer.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
        await peer.setLocalDescription(await peer.createAnswer())
        return {"sdp": peer.localDescription.sdp, "type": peer.localDescription.type}

    return app


def measure(transport: str, seconds: float, width: int, height: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    delays: list[float] = []
    port = free_port()
    server, thread = serve(gradio_app(delays) if transport == "gradio" else webrtc_app(delays), port)
    script = CANVAS % dict(width=width, height=height, stamp=STAMP_JS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS + [
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])
        page = browser.new_context(permissions=["camera"]).new_page()
        page.add_init_script(script)
        page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
        if transport == "gradio":
            page.locator("#camera").get_by_text("Click to Access Webcam").click(timeout=60_000)
            page.locator("#camera button[aria-label='capture photo']").click()  # (starts the stream)
        time.sleep(seconds)
        browser.close()
    server.should_exit = True
    thread.join(timeout=10)
    return delays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--size", default="640x480", help="the camera's WIDTHxHEIGHT")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    result = {"command": "python bench/bench_camera_transport.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs", "size": args.size}
    for transport in ("gradio", "webrtc"):
        delays = measure(transport, args.seconds, width, height)
        result[transport] = {"frames_per_s": round(len(delays) / args.seconds, 1)} | ({
            "median_s": round(statistics.median(delays), 3), "p90_s": round(float(np.percentile(delays, 90)), 3),
            "worst_s": round(max(delays), 3)} if delays else {})
        print(transport, result[transport], flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
