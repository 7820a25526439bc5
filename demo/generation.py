"""The one streaming handler behind every tab: runs the pipeline core and yields UI updates."""
from __future__ import annotations

import gc
import logging
import random
from dataclasses import dataclass
from typing import Iterator

import gradio as gr
import torch

from pipelines import generate
from pipelines.core import GenerationRequest, RequestError

from .media import StreamRecorder
from .runtime import Runtime
from .session import SessionControl

log = logging.getLogger(__name__)
MAX_SEED = 2**31 - 1


@dataclass
class StreamUpdate:
    segment: object  # a .ts path, or gr.skip() to leave the stream as it is
    preview: object
    status: str
    video: str | None
    seed: int

    def as_tuple(self) -> tuple:
        return self.segment, self.preview, self.status, self.video, self.seed


def pick_seed(seed: float | int | None, randomize: bool) -> int:
    if randomize or seed is None:
        return random.randint(0, MAX_SEED)
    return int(seed) % (MAX_SEED + 1)


def parse_resolution(text: str) -> tuple[int, int]:
    """'832x480' (width x height) -> (height, width); a gr.Error for anything else."""
    try:
        return generate.parse_resolution(str(text))
    except ValueError as err:
        raise gr.Error(str(err)) from err


def stream_video(runtime: Runtime, session: SessionControl, request: GenerationRequest, fps: int) -> Iterator[tuple]:
    """Yields (segment, preview, status, final mp4, seed) as each block is decoded."""
    if runtime.pipeline is None:
        raise gr.Error(runtime.load_error or "The model is not loaded.")
    pipeline = runtime.pipeline
    try:
        num_blocks, _, _ = pipeline.validate(request)
    except RequestError as err:
        raise gr.Error(str(err)) from err
    recorder = StreamRecorder(session.new_run_dir(), int(fps))
    yield StreamUpdate(gr.skip(), gr.skip(), f"Starting: {num_blocks} blocks …", None, request.seed).as_tuple()
    status, blocks_done, block_s, first_frame_s = "", 0, 0.0, None
    with runtime.gpu_lock:
        try:
            for result in pipeline.generate(request, cancel=session.stop_requested.is_set):
                segment = recorder.add_block(result.frames)
                first_frame_s = first_frame_s or result.elapsed_s
                block_s += result.block_s
                if result.complete:
                    blocks_done, last_block_s, block_s = blocks_done + 1, block_s, 0.0
                    status = (f"Block {blocks_done}/{num_blocks} · {last_block_s * 1e3:.0f} ms/block · "
                              f"{recorder.frames / result.elapsed_s:.1f} FPS · {recorder.frames} frames · "
                              f"first frame after {first_frame_s:.2f} s")
                else:
                    status = f"Block {result.index + 1}/{num_blocks} · first frame after {first_frame_s:.2f} s"
                if result.window_forced:
                    status += f" · rolling window of {result.window_frames} latent frames (memory budget)"
                yield StreamUpdate(str(segment), result.frames[-1], status, None, request.seed).as_tuple()
        except torch.cuda.OutOfMemoryError as err:
            log.warning("out of GPU memory: %s", err)
            raise gr.Error("Out of GPU memory. Try fewer blocks or a lower resolution.") from err
        finally:
            final = recorder.finish()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    stopped = session.stop_requested.is_set() and blocks_done < num_blocks
    done = f"Stopped after block {blocks_done}/{num_blocks}." if stopped else "Done."
    yield StreamUpdate(gr.skip(), gr.skip(), f"{done} {status}", str(final) if final else None,
                       request.seed).as_tuple()
