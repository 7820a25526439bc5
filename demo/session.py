"""Per-browser-session state: a stop flag, a private output folder, the prompt last extended."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pipelines.steering import PromptSteering

from .outputs import OutputStore


@dataclass
class FastRun:
    """What re-decoding a fast-decoded run with the full VAE needs: its latents, in order."""

    run_dir: Path
    fps: int
    latents: list = field(default_factory=list)


class SessionControl:
    """Created fresh for every browser session by gr.State; never shared between sessions."""

    def __init__(self, store: OutputStore | None = None) -> None:
        self.stop_requested = threading.Event()
        self._running = threading.Event()
        self.output_dir = store.new_session_dir() if store else Path(tempfile.mkdtemp(prefix="sf-session-"))
        self.store = store
        self.run_count = 0
        self.extended_from: dict[str, str] = {}  # tab -> the prompt whose extension the tab's box holds
        self.browser_first_frame_s: float | None = None  # reported by the page for the current run
        self.steering = PromptSteering()  # prompt switches for the current run
        self.fast_run: FastRun | None = None  # the last fast-decoded run, for a full-VAE re-decode

    def __deepcopy__(self, memo: dict) -> "SessionControl":
        # Gradio deep-copies state values between events; the stop flag must stay the same object
        # within a session. Each session gets its own instance from the gr.State factory.
        return self

    @property
    def is_running(self) -> bool:
        return self._running.is_set()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Marks a generation of this session as in progress (what Stop acts on)."""
        self._running.set()
        try:
            yield
        finally:
            self._running.clear()

    def request_stop(self) -> bool:
        """Asks the running generation to stop after its current block; False when none runs."""
        if not self.is_running:
            return False
        self.stop_requested.set()
        return True

    def new_run_dir(self) -> Path:
        if self.store is not None:
            self.store.enforce_cap()
        self.run_count += 1
        run_dir = self.output_dir / f"run{self.run_count:03d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.stop_requested.clear()
        self.browser_first_frame_s = None
        self.steering = PromptSteering()
        self.fast_run = None
        return run_dir

    def steer(self, prompt: str, mode: str = "recache") -> bool:
        """Posts a new prompt for the running generation (ValueError for a bad one); False when none runs."""
        PromptSteering.check(prompt, mode)
        if not self.is_running:
            return False
        self.steering.post(prompt, mode)
        return True

    def cleanup(self) -> None:
        shutil.rmtree(self.output_dir, ignore_errors=True)
