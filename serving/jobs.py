"""What a front end sends to whatever runs a stream, and what comes back: plain, picklable data.

A StreamJob holds the visitor's inputs as they arrived (uploads as their file bytes), so the same job runs in
the app's own process or on a pool worker on another machine. The run answers with StreamEvents: Started
once (what was resolved), then a Block per decoded block carrying encoded media (an MPEG-TS segment, the
next bytes of the progressive mp4, a JPEG preview), then Finished; Refused instead when it cannot run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.branch import Branch


@dataclass
class StreamJob:
    tab: str = "t2v"  # t2v | i2v | pose | v2v
    prompt: str = ""
    negative_prompt: str | None = None
    seed: int = 0
    num_blocks: int | None = None
    height: int | None = None
    width: int | None = None
    fps: int = 16
    continuous: bool = False
    fast_decode: bool = False
    drift_guard: float | None = None  # re-cache when a block's drift score passes this (pipelines/drift.py)
    lora: str | None = None  # a file name in the worker's <weights>/loras
    lora_strength: float = 1.0
    extend: bool = False  # rewrite the prompt with the prompt extender first
    image: bytes | None = field(default=None, repr=False)  # image-to-video: the uploaded first frame
    reference: bytes | None = field(default=None, repr=False)  # pose: the character
    driving_video: bytes | None = field(default=None, repr=False)  # pose: the driving (or pose) video file
    is_pose_video: bool = False
    source_video: bytes | None = field(default=None, repr=False)  # video-to-video: the input video file
    strength: float = 0.6  # video-to-video: how much of each input block is replaced by noise (1: text-to-video)
    camera: object = field(default=None, repr=False)  # video-to-video or pose from the browser's camera: the session's
    # pipelines.video_input.LiveFrames (in the front end's process; a pool relays its frames instead: camera_relay)
    camera_relay: bool = False  # a pool worker: the camera's frames come through the control board
    replay: str | None = field(default=None, repr=False)  # a run record's JSON: that run again (its own prompt,
    # seed, size, LoRAs and prompt switches; the fields above only describe it to the front end)
    branch: Branch | None = field(default=None, repr=False)  # go on from a block of the run the fields above
    # describe (its first prompt, seed, size and inputs) with the kept blocks before it


@dataclass
class Waiting:
    """Not started yet: place in the queue (1 = next), live workers and the estimated wait."""

    position: int
    waiting: int
    workers: int
    estimate_s: float | None


@dataclass
class Started:
    num_blocks: int
    height: int
    width: int
    seed: int
    prompt: str  # the prompt it runs under (extended when asked and the extender worked)
    extended: str | None  # the extender's text, for the page's box
    note: str  # what the page should know (prompt cut, fast paths, extension failed)
    worker: str = "local"
    worker_pid: int | None = None
    worker_actor: str | None = None  # the Ray actor name of a pool worker (to replace it when it stalls)


@dataclass
class Block:
    index: int
    num_blocks: int
    complete: bool
    frames: int  # video frames in this block
    segment: bytes = field(repr=False)  # the block as a short MPEG-TS file for the live player (empty for a
    # restored block: a branch's live stream starts at its branch point)
    mp4: bytes = field(repr=False)  # the progressive mp4's bytes written since the last event
    preview: bytes = field(repr=False)  # the block's last frame as JPEG
    elapsed_s: float = 0.0
    block_s: float = 0.0
    prompt: str = ""
    switch_ms: float | None = None
    window_frames: int | None = None
    window_forced: bool = False
    latents: object = field(default=None, repr=False)  # the block's clean latents (CPU): for a full-VAE re-decode
    # and for branches
    switch_mode: str | None = None
    reseed: int | None = None
    rng_state: object = field(default=None, repr=False)  # the random generator after this block (for branches)
    restored: bool = False  # a branch's block from before its branch point
    drift: dict | None = None  # the block's drift statistics (pipelines.drift.BlockDrift.as_dict), complete blocks
    refreshed: bool = False  # the drift guard re-cached before this block


@dataclass
class Finished:
    mp4: bytes = field(repr=False)  # the mp4's last bytes (written when the encoder closed)
    peak_gpu_bytes: int | None = None
    record: str | None = field(default=None, repr=False)  # the run record's JSON (pipelines/run_record.py)


@dataclass
class Refused:
    """The job cannot run (or could not go on): a user-facing message."""

    message: str


StreamEvent = Waiting | Started | Block | Finished | Refused


class WorkerLost(RuntimeError):
    """The worker running a stream died or stopped producing blocks; the message is for the visitor."""
