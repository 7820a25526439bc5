"""Time to the first frame as the user sees it: starts `python app.py` with the given options, drives
the text-to-video tab in headless Chromium and records, per run, the server's figure (from the status
line) and the page's own click-to-first-frame-on-screen time (#browser-timing-t2v).

    python bench/bench_browser.py [--runs 5] [--blocks 3] [--app-args "--config configs/tiny.yaml"] [--out F]

Needs Chromium (CHROMIUM_PATH or `chromium` on PATH) and playwright, as the browser tests do.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMING_GRACE_S = 5.0
sys.path.insert(0, str(ROOT))
from tests.app_server import AppServer  # noqa: E402
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402


def first_frame_times(page, prompt: str, blocks: int, timeout_s: float = 300) -> tuple[float, float]:
    """(server seconds, browser seconds) to the first frame of one text-to-video run."""
    page.get_by_label("Prompt").first.fill(prompt)
    box = page.get_by_label("Blocks", exact=False).first
    box.fill(str(blocks))
    box.press("Enter")
    before = page.locator("#browser-timing-t2v").inner_text()  # the previous run's (Gradio owns the node)
    page.get_by_role("button", name="Generate").first.click()
    deadline = time.monotonic() + timeout_s
    status = timing = ""
    done_at = None
    started = False  # the previous run's "Done." stays on screen until this run's first update
    while time.monotonic() < deadline:
        status = page.locator("#status-t2v").inner_text()
        started = started or not status.startswith("Done.")
        timing = page.locator("#browser-timing-t2v").inner_text()
        finished = started and status.startswith("Done.") and f"/{blocks}" in status and "after the click" in timing
        if finished and done_at is None:
            done_at = time.monotonic()
        # the browser's figure arrives by its own event; an unchanged text after a grace period is
        # this run's value rounding to the previous one's
        if finished and (timing != before or time.monotonic() - done_at > TIMING_GRACE_S):
            break
        time.sleep(0.05)
    else:
        raise TimeoutError(f"run did not finish: {status!r} {timing!r}")
    server = float(status.split("first frame after")[1].split("s (server)")[0])
    browser = float(timing.split("screen")[1].split("s after")[0])
    return server, browser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--app-args", default="", help="options passed to app.py")
    parser.add_argument("--prompt", default="a red circle moves to the right on a dark blue background")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    server = AppServer(*shlex.split(args.app_args))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server.url, wait_until="domcontentloaded")
            page.wait_for_selector("#banner", timeout=120_000)
            runs = [first_frame_times(page, f"{args.prompt}", args.blocks) for _ in range(args.runs + 1)][1:]
            browser.close()
    finally:
        server.stop()
    server_s, browser_s = [r[0] for r in runs], [r[1] for r in runs]
    result = {
        "command": "python bench/bench_browser.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "app_args": args.app_args, "blocks": args.blocks, "runs": args.runs, "warm_up_runs": 1,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "server_first_frame_s": server_s, "browser_first_frame_s": browser_s,
        "server_first_frame_s_median": round(statistics.median(server_s), 3),
        "browser_first_frame_s_median": round(statistics.median(browser_s), 3),
        "browser_minus_server_s_median": round(statistics.median(b - s for s, b in runs), 3)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
