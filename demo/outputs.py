"""Where the server writes: per-session run folders (removed when the session or the server ends,
capped in total size) and the run-metrics log, which stays."""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_CAP_BYTES = 2 * 2**30


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class OutputStore:
    """The outputs folder of one server process."""

    def __init__(self, root: str | Path, cap_bytes: int = DEFAULT_CAP_BYTES) -> None:
        self.root = Path(root).expanduser().resolve()
        (self.root / "sessions").mkdir(parents=True, exist_ok=True)
        # One folder per server process, so servers sharing an outputs folder never delete each other's files.
        self.sessions = Path(tempfile.mkdtemp(prefix="server-", dir=self.root / "sessions"))
        self.cap_bytes = cap_bytes
        self._lock = threading.Lock()
        self._by_browser_session: dict[str, Path] = {}  # Gradio session hash -> that session's folder

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def new_session_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="sf-session-", dir=self.sessions))

    def enforce_cap(self) -> None:
        """Deletes the oldest finished runs (any session) until the run folders fit the cap."""
        with self._lock:
            runs = sorted((run for session in self.sessions.iterdir() if session.is_dir()
                           for run in session.iterdir() if run.is_dir()), key=lambda p: p.stat().st_mtime)
            sizes = {run: folder_bytes(run) for run in runs}
            total = sum(sizes.values())
            for run in runs:
                if total <= self.cap_bytes:
                    break
                shutil.rmtree(run, ignore_errors=True)
                total -= sizes[run]
                log.info("output cap %.0f MB: removed %s", self.cap_bytes / 1e6, run.relative_to(self.root))

    def track(self, session_hash: str, folder: Path) -> None:
        """Remembers which folder a browser session writes to, so its folder can go when the tab closes."""
        with self._lock:
            self._by_browser_session[session_hash] = folder

    def end_session(self, session_hash: str) -> None:
        """The browser tab closed: its videos go now (Gradio itself keeps a closed session for an hour)."""
        with self._lock:
            folder = self._by_browser_session.pop(session_hash, None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("session ended: removed %s", folder.relative_to(self.root))

    def remove_sessions(self) -> None:
        """At shutdown: every session's videos of this server go; the metrics log stays."""
        shutil.rmtree(self.sessions, ignore_errors=True)

