"""Per-browser-session state: a stop flag and a private output folder."""
from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path


class SessionControl:
    """Created fresh for every browser session by gr.State; never shared between sessions."""

    def __init__(self) -> None:
        self.stop_requested = threading.Event()
        self.output_dir = Path(tempfile.mkdtemp(prefix="sf-session-"))
        self.run_count = 0

    def __deepcopy__(self, memo: dict) -> "SessionControl":
        # Gradio deep-copies state values between events; the stop flag must stay the same object
        # within a session. Each session gets its own instance from the gr.State factory.
        return self

    def new_run_dir(self) -> Path:
        self.run_count += 1
        run_dir = self.output_dir / f"run{self.run_count:03d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.stop_requested.clear()
        return run_dir

    def cleanup(self) -> None:
        shutil.rmtree(self.output_dir, ignore_errors=True)
