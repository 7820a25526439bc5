"""The one streaming handler behind every tab: runs the pipeline core and yields UI updates."""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
import random
from dataclasses import dataclass
from typing import Iterator

import gradio as gr
import torch

from pipelines import config
from pipelines.core import MAX_SEED, GenerationRequest, RequestError
from pipelines.loading.prompt_extender import ExtenderError
from pipelines.loading.video_io import write_video

from .metrics import RunRecord
from .recording import StreamRecorder
from .runtime import Runtime
from .session import FastRun, SessionControl

log = logging.getLogger(__name__)


class UserError(gr.Error):
    """An expected problem with the user's input: shown in the UI, logged as one line, no traceback."""

    def __init__(self, message: str) -> None:
        log.info("refused request: %s", message)
        super().__init__(message, print_exception=False)


@dataclass
class StreamUpdate:
    segment: object  # a .ts path, or gr.skip() to leave the stream as it is
    preview: object
    status: str
    video: str | None
    seed: int
    extended_prompt: object = dataclasses.field(default_factory=gr.skip)
    timeline: object = dataclasses.field(default_factory=gr.skip)

    @classmethod
    def status_only(cls, status: str) -> tuple:
        """The outputs of an update that only says something in the status line."""
        return cls(gr.skip(), gr.skip(), status, gr.skip(), gr.skip()).as_tuple()

    def as_tuple(self) -> tuple:
        return self.segment, self.preview, self.status, self.video, self.seed, self.extended_prompt, self.timeline


def whole_number(value: float | int | str | None, name: str, low: int | None = None, high: int | None = None) -> int:
    """An integer input from the UI or the API, refused (not rounded) when it is not one; the range
    check is left to the caller when low/high are None."""
    span = f" from {low} to {high}" if low is not None and high is not None else ""
    message = f"{name} must be a whole number{span}, got {value!r}."
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(message) from None
    if not math.isfinite(number) or number != int(number):
        raise UserError(message)
    if (low is not None and number < low) or (high is not None and number > high):
        raise UserError(message)
    return int(number)


def pick_seed(seed: float | int | None, randomize: bool) -> int:
    """The seed to use: random when asked (or empty), otherwise exactly the given one."""
    if randomize or seed is None or seed == "":
        return random.randint(0, MAX_SEED)
    return whole_number(seed, "Seed", 0, MAX_SEED)


def parse_resolution(text: str) -> tuple[int, int]:
    """'832x480' (width x height) -> (height, width); a user error for anything else."""
    try:
        return config.parse_resolution(str(text))
    except ValueError as err:
        raise UserError(str(err)) from err


def extend_request(runtime: Runtime, session: SessionControl, tab: str, request: GenerationRequest,
                   extend: bool, edited: str | None) -> tuple[GenerationRequest, object, str]:
    """Applies prompt extension: (request to run, update of the extended-prompt box, status note).

    The box's text is used as it is (the user may have edited it) while it belongs to the current
    prompt; a new prompt is extended afresh. Failures leave the typed prompt in use.
    """
    prompt = (request.prompt or "").strip()
    if not extend or not prompt or runtime.extender is None:
        return request, gr.skip(), ""
    if edited and edited.strip() and session.extended_from.get(tab) == prompt:
        return dataclasses.replace(request, prompt=edited.strip()), gr.skip(), ""
    try:
        text = runtime.extend_prompt(prompt)
    except ExtenderError as err:
        log.warning("%s", err)
        return request, gr.skip(), f" · prompt extension failed ({err}); used the prompt as typed"
    session.extended_from[tab] = prompt
    return dataclasses.replace(request, prompt=text), text, ""


class PromptTimeline:
    """Which block ranges were generated under which prompt (shown under the video)."""

    def __init__(self) -> None:
        self.spans: list[list] = []  # [first block, last block, prompt, switch ms]

    def add(self, block: int, prompt: str, switch_ms: float | None) -> None:
        if self.spans and self.spans[-1][2] == prompt:
            self.spans[-1][1] = block
        else:
            self.spans.append([block, block, prompt, switch_ms])

    def markdown(self) -> str:
        rows = []
        for first, last, prompt, switch_ms in self.spans:
            blocks = f"block {first}" if first == last else f"blocks {first}-{last}"
            cost = f" (switch took {switch_ms:.0f} ms)" if switch_ms is not None else ""
            rows.append(f"- {blocks}: {prompt[:120]}{'…' if len(prompt) > 120 else ''}{cost}")
        return "\n".join(rows)


def truncation_note(runtime: Runtime, prompt: str) -> str:
    encoder = runtime.pipeline.prompt_encoder
    tokens = encoder.token_count(prompt)
    if tokens <= encoder.text_len:
        return ""
    return f" · prompt cut to its first {encoder.text_len} of {tokens} tokens (the text encoder's limit)"


def stream_video(runtime: Runtime, session: SessionControl, request: GenerationRequest, fps: int, tab: str = "t2v",
                 extended_prompt: object = None, note: str = "") -> Iterator[tuple]:
    """Yields (segment, preview, status, final mp4, seed, extended prompt) as each block is decoded,
    and appends the run's metrics when it ends (done, stopped or failed)."""
    if runtime.pipeline is None:
        raise UserError(runtime.load_error or "The model is not loaded.")
    pipeline = runtime.pipeline
    if not session.is_waiting:  # (a caller that did not announce the request: fresh stop flag and switches)
        session.request_sent()
    try:
        validated = pipeline.validate(dataclasses.replace(request, steering=session.steering))
    except RequestError as err:
        raise UserError(str(err)) from err
    request, num_blocks, height, width = validated.request, validated.num_blocks, validated.height, validated.width
    try:
        runtime.check_cost(num_blocks, height, width, request.continuous)
    except ValueError as err:
        raise UserError(str(err)) from err
    extended_prompt = gr.skip() if extended_prompt is None else extended_prompt
    note += truncation_note(runtime, request.prompt)
    fast_path = pipeline.fast_path_note(request)
    note += f" · {fast_path}" if fast_path else ""
    recorder = StreamRecorder(session.new_run_dir(), int(fps))
    fast_run = FastRun(recorder.run_dir, int(fps)) if request.fast_decode and not request.continuous else None
    run = RunRecord(tab=tab, model=runtime.config.name, device=str(pipeline.device), resolution=f"{width}x{height}",
                    blocks=num_blocks, profile=runtime.memory_plan.profile.name if runtime.memory_plan else None)
    yield StreamUpdate(gr.skip(), gr.skip(), f"Starting: {'continuous, up to ' + format(runtime.config.continuous_minutes, 'g') + ' min of video' if request.continuous else str(num_blocks) + ' blocks'} …{note}", None, request.seed,
                       extended_prompt, timeline="").as_tuple()
    status, block_s, total_block_s = "", 0.0, 0.0
    cap_minutes = runtime.config.continuous_minutes

    def progress(block: int) -> str:
        """'Block 3/7', or for a continuous run the video made so far and its cap."""
        if not request.continuous:
            return f"Block {block}/{num_blocks}"
        return f"{recorder.frames / fps:.0f} s of video (stops at {cap_minutes:g} min)"
    timeline = PromptTimeline()
    cuda = pipeline.device.type == "cuda"
    with runtime.gpu_lock, session.running():
        if cuda:
            torch.cuda.reset_peak_memory_stats(pipeline.device)
        try:
            for result in runtime.generate_blocks(validated, session.stop_requested.is_set):
                segment = recorder.add_block(result.frames)
                if fast_run is not None and result.latents is not None:
                    fast_run.latents.append(result.latents)
                run.server_first_frame_s = run.server_first_frame_s or result.elapsed_s
                block_s += result.block_s
                run.fps = recorder.frames / result.elapsed_s
                timeline_update = gr.skip()
                if result.complete:
                    run.blocks_done += 1
                    timeline.add(run.blocks_done, result.prompt, result.switch_ms)
                    timeline_update = timeline.markdown() if len(timeline.spans) > 1 else gr.skip()
                    total_block_s += block_s
                    run.ms_per_block = total_block_s * 1e3 / run.blocks_done
                    status = (f"{progress(run.blocks_done)} · {block_s * 1e3:.0f} ms/block · "
                              f"{run.fps:.1f} FPS · {recorder.frames} frames · "
                              f"first frame after {run.server_first_frame_s:.2f} s (server)")
                    block_s = 0.0
                else:
                    status = (f"{progress(result.index + 1)} · "
                              f"first frame after {run.server_first_frame_s:.2f} s (server)")
                if result.window_forced:
                    status += f" · rolling window of {result.window_frames} latent frames (memory budget)"
                status += note
                yield StreamUpdate(str(segment), result.frames[-1], status, None, request.seed,
                                   timeline=timeline_update).as_tuple()
                if result.complete and session.stop_requested.is_set():
                    break  # (the core checks too; this ends a ZeroGPU call, which cannot see the flag)
        except RequestError as err:  # (a LoRA file that cannot be merged is found when the run starts)
            run.failed = "refused"
            raise UserError(str(err)) from err
        except torch.cuda.OutOfMemoryError as err:
            log.warning("out of GPU memory: %s", str(err).splitlines()[0])
            run.failed = "out of GPU memory"
            raise UserError("Out of GPU memory. Try fewer blocks or a lower resolution.") from err
        except GeneratorExit:  # the browser went away: the run stops here, like a Stop
            raise
        except BaseException as err:
            run.failed = run.failed or type(err).__name__
            raise
        finally:
            final = recorder.finish()
            session.fast_run = fast_run if fast_run is not None and fast_run.latents else None
            run.cancelled = run.blocks_done < num_blocks and not run.failed
            run.browser_first_frame_s = session.browser_first_frame_s
            run.peak_gpu_bytes = torch.cuda.max_memory_allocated(pipeline.device) if cuda else None
            runtime.metrics.record(run)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    done = "Done."
    if run.cancelled:
        done = "Stopped." if request.continuous else f"Stopped after block {run.blocks_done}/{num_blocks}."
    # (the last update carries the timeline too: a predict() caller sees only this one)
    yield StreamUpdate(gr.skip(), gr.skip(), f"{done} {status}", str(final) if final else None,
                       request.seed, timeline=timeline.markdown() if len(timeline.spans) > 1 else "").as_tuple()


def redecode_with_vae(runtime: Runtime, session: SessionControl) -> tuple[str, str]:
    """(mp4 path, status): the session's last fast-decoded video decoded again with the full Wan VAE."""
    run = session.fast_run
    if run is None or runtime.pipeline is None:
        raise UserError("Nothing to re-decode: generate a video with the fast decoder first (continuous runs "
                        "are not kept).")
    path = run.run_dir / "video_full_vae.mp4"
    with runtime.gpu_lock:  # encoded as the run's own mp4
        frames = write_video(path, runtime.pipeline.decode_with_vae(run.latents), run.fps, progressive=True)
    return str(path), f"Re-decoded with the full Wan VAE: {frames} frames."
