"""Frames for video-to-video: a decoded file or a live feed, read block by block by the pipeline core.

The core asks for the next frames of each block (1 + 4(k-1) for the first block of k latent frames, 4k after) and
ends the run when the input has no more; frames are resized and centre-cropped to the request's size as images
are (core.prepare_image).
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Protocol

import numpy as np


class VideoSource(Protocol):
    total_frames: int | None  # None: a live feed, read until the run stops

    def read(self, count: int) -> list[np.ndarray] | None:
        """The next `count` frames (uint8 [H, W, 3]), or None when the input ended before that many arrived."""


class FrameList:
    """A whole video's frames (a file), read in order."""

    def __init__(self, frames: Iterable[np.ndarray]) -> None:
        self.frames = list(frames)
        self.total_frames = len(self.frames)
        self._next = 0

    def read(self, count: int) -> list[np.ndarray] | None:
        if self._next + count > self.total_frames:
            return None
        chunk = self.frames[self._next:self._next + count]
        self._next += count
        return chunk


class LiveFrames:
    """Frames pushed as they arrive (a camera), read by the run; `close()` ends it. A read waits up to `timeout_s`
    for its frames and then ends the input (a feed that stopped).

    keep_up: a live camera. A run slower than the camera would otherwise fall further behind it with every block
    (the delay to the screen growing without end); with keep_up a read that finds more frames waiting than it asks
    for skips the oldest, so each block restyles the newest frames.
    """

    total_frames = None

    def __init__(self, timeout_s: float = 10.0, keep_up: bool = False) -> None:
        self.timeout_s, self.keep_up = timeout_s, keep_up
        self.skipped = 0  # frames a keep_up read passed over
        self._frames: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self.ended_early = False  # the feed went silent for timeout_s (not closed)
        self.received = 0  # frames pushed: none means the camera never sent (no permission, or its stream not started)

    def push(self, frame: np.ndarray) -> None:
        if not self._closed.is_set():
            self.received += 1
            self._frames.put(frame)

    def close(self) -> None:
        self._closed.set()
        self._frames.put(None)

    def drain(self) -> tuple[list[np.ndarray], bool]:
        """(the frames waiting now, whether the feed was closed), without waiting: for a relay that forwards them."""
        frames, closed = [], False
        while True:
            try:
                frame = self._frames.get_nowait()
            except queue.Empty:
                return frames, closed
            if frame is None:
                closed = True
            else:
                frames.append(frame)

    def read(self, count: int) -> list[np.ndarray] | None:
        frames = []
        while self.keep_up and self._frames.qsize() > count:
            if self._frames.get_nowait() is None:
                return None
            self.skipped += 1
        while len(frames) < count:
            try:
                frame = self._frames.get(timeout=self.timeout_s)
            except queue.Empty:
                self.ended_early = True
                return None
            if frame is None:
                return None
            frames.append(frame)
        return frames
