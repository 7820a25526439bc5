"""The encoding half of a stream, where the frames are made: each block as bytes a front end can store as is."""
from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.loading.video_io import H264Writer

PREVIEW_QUALITY = 90


class BlockEncoder:
    """Encodes each block into a short MPEG-TS segment and into one progressive mp4, and hands out the mp4's
    new bytes as they are written, so a front end that appends them holds a playable file even when this
    process dies mid-run (no shared disk needed). Its files live in a private temporary folder."""

    def __init__(self, fps: int) -> None:
        self.fps = fps
        self.folder = Path(tempfile.mkdtemp(prefix="sf-encode-"))
        self._mp4: H264Writer | None = None
        self._sent = 0
        self._segments = 0

    def encode(self, frames: np.ndarray, live: bool = True) -> tuple[bytes, bytes, bytes]:
        """(segment, new mp4 bytes, JPEG preview of the last frame) for uint8 frames [T, H, W, 3]; without `live`
        only into the mp4 (the segment is empty)."""
        height, width = frames.shape[1], frames.shape[2]
        if self._mp4 is None:
            self._mp4 = H264Writer(self.folder / "video.mp4", width, height, self.fps, progressive=True)
        self._mp4.write(frames)
        if not live:
            return b"", self._new_mp4_bytes(), jpeg(frames[-1])
        self._segments += 1
        segment_path = self.folder / f"segment{self._segments:03d}.ts"
        with H264Writer(segment_path, width, height, self.fps) as segment:
            segment.write(frames)
        segment_bytes = segment_path.read_bytes()
        segment_path.unlink()
        return segment_bytes, self._new_mp4_bytes(), jpeg(frames[-1])

    def finish(self) -> bytes:
        """Closes the mp4 and returns its remaining bytes."""
        if self._mp4 is None:
            return b""
        self._mp4.close()
        tail = self._new_mp4_bytes()
        self.close()
        return tail

    def close(self) -> None:
        if self._mp4 is not None:
            self._mp4.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _new_mp4_bytes(self) -> bytes:
        path = self.folder / "video.mp4"
        if not path.is_file():
            return b""
        with path.open("rb") as file:
            file.seek(self._sent)
            data = file.read()
        self._sent += len(data)
        return data


def jpeg(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=PREVIEW_QUALITY)
    return buffer.getvalue()
