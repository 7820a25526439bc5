"""Input checks for uploaded images and the streamed/downloadable video files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import imageio_ffmpeg
from PIL import Image, UnidentifiedImageError

from pipelines.video_io import H264Writer

MAX_IMAGE_PIXELS = 40_000_000
MAX_VIDEO_FRAMES = 2000


class MediaError(ValueError):
    """An upload that cannot be used; the message is shown to the user."""


def load_image(path: str | Path) -> Image.Image:
    """Opens an uploaded image, refusing non-images and images too large to process safely."""
    try:
        with Image.open(path) as probe:
            width, height = probe.size
            if width * height > MAX_IMAGE_PIXELS:
                raise MediaError(f"The image is {width}x{height}; please upload one under "
                                 f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels.")
            image = probe.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as err:
        raise MediaError(f"Could not read the upload as an image ({type(err).__name__}).") from err
    return image


def read_video(path: str | Path, max_frames: int = MAX_VIDEO_FRAMES) -> list[np.ndarray]:
    """All frames (RGB uint8) of an uploaded video; refuses unreadable or empty videos."""
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        width, height = meta["size"]
        frames = []
        for raw in reader:
            frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3))
            if len(frames) >= max_frames:
                break
        reader.close()
    except (OSError, RuntimeError, StopIteration, KeyError) as err:
        raise MediaError(f"Could not read the upload as a video ({type(err).__name__}).") from err
    if not frames:
        raise MediaError("The driving video has no frames.")
    return frames


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
