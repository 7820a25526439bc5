"""A run's video as it arrives: short segments for the browser and one progressive mp4 for download, written into
the visitor's session folder from the encoded bytes the backend sends (serving/encoding.py makes them)."""
from __future__ import annotations

from pathlib import Path

from pipelines.loading.video_io import count_frames


class StreamRecorder:
    """Stores each block's .ts segment and appends the progressive mp4's bytes (playable up to its last complete
    second even when the run is cut off). Only the last few segments stay on disk: Gradio has copied the older
    ones to the browser's stream, and a continuous run makes thousands."""

    KEEP_SEGMENTS = 4

    def __init__(self, run_dir: Path, fps: int) -> None:
        self.run_dir = run_dir
        self.fps = fps
        self.video = run_dir / "video.mp4"
        self.segments = 0
        self.frames = 0

    def add_block(self, segment: bytes, mp4: bytes, frames: int) -> Path | None:
        """The block's segment file for the live player (None for a block with no segment: a branch's restored
        blocks go into its mp4 only)."""
        self._append(mp4)
        self.frames += frames
        if not segment:
            return None
        self.segments += 1
        (self.run_dir / f"segment{self.segments - self.KEEP_SEGMENTS:03d}.ts").unlink(missing_ok=True)
        path = self.run_dir / f"segment{self.segments:03d}.ts"
        path.write_bytes(segment)
        return path

    def finish(self, tail: bytes = b"", record: str | None = None) -> Path | None:
        """The mp4 (None when no block arrived); the run record goes beside it as run.json."""
        self._append(tail)
        if record is not None:
            (self.run_dir / "run.json").write_text(record)
        return self.video if self.frames else None

    def salvage(self) -> tuple[Path | None, int]:
        """(the mp4, its playable frames) of a run cut off where it was made: the bytes that arrived hold whole
        one-second fragments only (None, 0 when not even one)."""
        if not self.video.is_file():
            return None, 0
        try:
            frames = count_frames(self.video)
        except RuntimeError:  # (only the header arrived)
            frames = 0
        return (self.video, frames) if frames else (None, 0)

    def _append(self, data: bytes) -> None:
        if data:
            with self.video.open("ab") as file:
                file.write(data)
