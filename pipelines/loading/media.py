"""Input checks for uploaded images and driving videos."""
from __future__ import annotations

from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image, UnidentifiedImageError

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


def read_video(path: str | Path, max_frames: int = MAX_VIDEO_FRAMES, fps: float | None = None) -> list[np.ndarray]:
    """All frames (RGB uint8) of an uploaded video (resampled to `fps` when given); refuses unreadable or empty
    videos."""
    try:
        reader = imageio_ffmpeg.read_frames(str(path), output_params=["-vf", f"fps={fps:g}"] if fps else None)
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
