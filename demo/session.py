"""Per-browser-session state: a stop flag, a private output folder, the prompt last extended.

A generation request is *waiting* from the moment the page sends it (or the handler starts, for API
clients) until it runs: a Stop or a new prompt sent while it waits applies to it.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pipelines.steering import PromptSteering
from pipelines.video_input import LiveFrames

from .branches import RunTree
from .outputs import OutputStore

DEFAULT_BRANCH_MEMORY_MB = 256


@dataclass
class FastRun:
    """What re-decoding a fast-decoded run with the full VAE needs: its latents, in order."""

    run_dir: Path
    fps: int
    latents: list = field(default_factory=list)


class SessionControl:
    """Created fresh for every browser session by gr.State; never shared between sessions."""

    # How long a new prompt waits for a run that was just submitted (an API client's steer right after
    # submit() can arrive before its queued request has started).
    STEER_GRACE_S = 1.0
    # How long a live run waits for the next camera frame before it ends (the camera stopped sending).
    CAMERA_TIMEOUT_S = 10.0

    def __init__(self, store: OutputStore | None = None, branch_memory_mb: float = DEFAULT_BRANCH_MEMORY_MB) -> None:
        self.stop_requested = threading.Event()
        self._running = threading.Event()
        self._waiting = threading.Event()  # a request was sent and has not started yet
        self._active = threading.Event()  # waiting or running
        self.output_dir = store.new_session_dir() if store else Path(tempfile.mkdtemp(prefix="sf-session-"))
        self.store = store
        self.run_count = 0
        self.extended_from: dict[str, str] = {}  # tab -> the prompt whose extension the tab's box holds
        self.browser_first_frame_s: float | None = None  # reported by the page for the current run
        self.steering = PromptSteering()  # prompt switches for the current run
        self.fast_run: FastRun | None = None  # the last fast-decoded run, for a full-VAE re-decode
        self.runs = RunTree(int(branch_memory_mb * 2**20))  # this visitor's runs and the blocks kept for branches
        self.camera: LiveFrames | None = None  # the camera frames of a live run (video-to-video, pose), while it runs

    def __deepcopy__(self, memo: dict) -> "SessionControl":
        # Gradio deep-copies state values between events; the stop flag must stay the same object
        # within a session. Each session gets its own instance from the gr.State factory.
        return self

    @property
    def is_running(self) -> bool:
        return self._running.is_set()

    @property
    def is_waiting(self) -> bool:
        return self._waiting.is_set()

    def request_sent(self) -> None:
        """A generation request of this session is on its way: a fresh stop flag and prompt switches, which a
        Stop or a new prompt sent while it waits in the queue will use (a run still stopping keeps its own)."""
        self.stop_requested = threading.Event()
        self.steering = PromptSteering()
        self._waiting.set()
        self._active.set()

    def dropped_before_start(self) -> bool:
        """At the start of a handler: True when Stop was pressed while its request waited (it must not run).
        A request that was not announced (an API call) is announced here."""
        if self.is_waiting and self.stop_requested.is_set():
            self.request_done()
            return True
        if not self.is_waiting:
            self.request_sent()
        return False

    def request_done(self) -> None:
        """The request ended before it ran (refused, or dropped by Stop)."""
        self._waiting.clear()
        if not self.is_running:
            self._active.clear()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Marks a generation of this session as in progress (what Stop acts on)."""
        self._running.set()
        self._waiting.clear()
        try:
            yield
        finally:
            self._running.clear()
            self._active.clear()

    def request_stop(self) -> str | None:
        """Asks the running generation to stop after its current block, or drops a request still waiting;
        which one it was ("running", "waiting"), None when there is neither."""
        state = "running" if self.is_running else "waiting" if self.is_waiting else None
        if state is not None:
            self.stop_requested.set()
        if self.camera is not None:  # (a run waiting for camera frames stops at once)
            self.camera.close()
        return state

    def open_camera(self) -> LiveFrames:
        """A fresh feed for a live run; camera frames sent before it are dropped."""
        self.close_camera()
        self.camera = LiveFrames(self.CAMERA_TIMEOUT_S, keep_up=True)
        return self.camera

    def close_camera(self) -> None:
        if self.camera is not None:
            self.camera.close()
            self.camera = None

    def camera_frame(self, frame) -> None:
        """A frame from the browser's camera, for the live run if one is reading."""
        if self.camera is not None and frame is not None:
            self.camera.push(frame)

    def new_run_dir(self) -> Path:
        if self.store is not None:
            self.store.enforce_cap()
        self.run_count += 1
        run_dir = self.output_dir / f"run{self.run_count:03d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.browser_first_frame_s = None
        self.fast_run = None
        return run_dir

    def steer(self, prompt: str, mode: str = "recache") -> bool:
        """Posts a new prompt for the running or waiting generation (ValueError for a bad one); False when
        there is none (after STEER_GRACE_S for one to start)."""
        PromptSteering.check(prompt, mode)
        if not self._active.wait(self.STEER_GRACE_S):
            return False
        self.steering.post(prompt, mode)
        return True

    def cleanup(self) -> None:
        self.request_done()
        shutil.rmtree(self.output_dir, ignore_errors=True)
