"""A run's video as it streams: short segments for the browser and one progressive mp4 for download."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.loading.video_io import H264Writer


class StreamRecorder:
    """Writes each decoded block as a short .ts segment for the browser and into one progressive mp4
    (playable even if the run is cut off). Only the last few segments stay on disk: Gradio has
    copied the older ones to the browser's stream, and a continuous run makes thousands."""

    KEEP_SEGMENTS = 4

    def __init__(self, run_dir: Path, fps: int) -> None:
        self.run_dir = run_dir
        self.fps = fps
        self.final: H264Writer | None = None
        self.segments = 0

    def add_block(self, frames: np.ndarray) -> Path:
        if self.final is None:
            self.final = H264Writer(self.run_dir / "video.mp4", frames.shape[2], frames.shape[1], self.fps,
                                    progressive=True)
        self.final.write(frames)
        self.segments += 1
        (self.run_dir / f"segment{self.segments - self.KEEP_SEGMENTS:03d}.ts").unlink(missing_ok=True)
        segment = H264Writer(self.run_dir / f"segment{self.segments:03d}.ts", frames.shape[2], frames.shape[1],
                             self.fps)
        segment.write(frames)
        return segment.close()

    def finish(self) -> Path | None:
        return None if self.final is None else self.final.close()

    @property
    def frames(self) -> int:
        return 0 if self.final is None else self.final.frames_written
