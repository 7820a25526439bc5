"""H.264 writing through imageio-ffmpeg (mp4 for downloads, MPEG-TS for streamed segments)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import imageio_ffmpeg
import numpy as np


class H264Writer:
    """Incremental H.264 writer: frames can be appended block by block as they are decoded."""

    def __init__(self, path: str | Path, width: int, height: int, fps: int, quality: int = 18,
                 progressive: bool = False) -> None:
        """progressive: a fragmented mp4 with a key frame every second, playable up to its last
        complete second even if the writer never closes (a stopped, cut off or crashed run)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.frames_written = 0
        extra = ["-g", str(fps), "-movflags", "frag_keyframe+empty_moov+default_base_moof", "-flush_packets", "1"] \
            if progressive else []
        self._writer = imageio_ffmpeg.write_frames(
            str(self.path), (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
            macro_block_size=2, ffmpeg_log_level="error",
            output_params=["-crf", str(quality), "-preset", "veryfast", *extra])
        self._writer.send(None)

    def write(self, frames: np.ndarray) -> None:
        for frame in frames:
            self._writer.send(np.ascontiguousarray(frame))
            self.frames_written += 1

    def close(self) -> Path:
        self._writer.close()
        return self.path

    def __enter__(self) -> "H264Writer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_video(path: str | Path, blocks: Iterable[np.ndarray], fps: int, progressive: bool = False) -> int:
    """Writes uint8 [T, H, W, 3] frame blocks, as they come, to one H.264 file (the suffix picks the container;
    progressive: see H264Writer); returns the number of frames written. The one writer of whole videos: the
    CLI, the app's re-decode and training's validation videos."""
    writer: H264Writer | None = None
    try:
        for frames in blocks:
            if writer is None:
                writer = H264Writer(path, frames.shape[2], frames.shape[1], fps, progressive=progressive)
            writer.write(frames)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError("no frames to write")
    return writer.frames_written


def count_frames(path: str | Path) -> int:
    return imageio_ffmpeg.count_frames_and_secs(str(path))[0]
