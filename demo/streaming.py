"""The one streaming handler behind every tab: runs the pipeline core and yields UI updates."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Iterator

import gradio as gr
from PIL import Image

from pipelines import config
from pipelines.core import MAX_SEED, GenerationRequest, RequestError, validate_request
from pipelines.loading.lora import LoraChoice
from serving.jobs import Block, Finished, Refused, Started, StreamJob, Waiting, WorkerLost

from .drift_plot import DriftPlot
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
    run: object = dataclasses.field(default_factory=gr.skip)  # this run's number in the session (for branches)
    drift: object = dataclasses.field(default_factory=gr.skip)  # the drift plot's rows

    @classmethod
    def status_only(cls, status: str) -> tuple:
        """The outputs of an update that only says something in the status line."""
        return cls(gr.skip(), gr.skip(), status, gr.skip(), gr.skip()).as_tuple()

    def as_tuple(self) -> tuple:
        return (self.segment, self.preview, self.status, self.video, self.seed, self.extended_prompt, self.timeline,
                self.run, self.drift)


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


def choose_extension(runtime: Runtime, session: SessionControl, job: StreamJob, extend: bool,
                     edited: str | None) -> StreamJob:
    """Whether the job asks the backend to extend its prompt. The box's text is used as it is (the user may have
    edited it) while it belongs to the current prompt; a new prompt is extended afresh (its text comes back in
    the Started event)."""
    prompt = (job.prompt or "").strip()
    if not extend or not prompt or not runtime.info.extender:
        return job
    if edited and edited.strip() and session.extended_from.get(job.tab) == prompt:
        return dataclasses.replace(job, prompt=edited.strip())
    return dataclasses.replace(job, extend=True)


class PromptTimeline:
    """Which block ranges were generated under which prompt (shown under the video)."""

    def __init__(self) -> None:
        self.spans: list[list] = []  # [first block, last block, prompt, switch ms]
        self.refreshes: list[int] = []  # blocks the drift guard re-cached before

    def add(self, block: int, prompt: str, switch_ms: float | None, refreshed: bool = False) -> None:
        if refreshed:
            self.refreshes.append(block)
        if self.spans and self.spans[-1][2] == prompt:
            self.spans[-1][1] = block
        else:
            self.spans.append([block, block, prompt, switch_ms])

    @property
    def worth_showing(self) -> bool:
        return len(self.spans) > 1 or bool(self.refreshes)

    def markdown(self) -> str:
        rows = []
        for first, last, prompt, switch_ms in self.spans:
            blocks = f"block {first}" if first == last else f"blocks {first}-{last}"
            cost = f" (switch took {switch_ms:.0f} ms)" if switch_ms is not None else ""
            rows.append(f"- {blocks}: {prompt[:120]}{'…' if len(prompt) > 120 else ''}{cost}")
        if self.refreshes:
            rows.append(f"- drift guard re-cached before block{'s' if len(self.refreshes) > 1 else ''} "
                        f"{', '.join(map(str, self.refreshes))}")
        return "\n".join(rows)


def waiting_status(event: Waiting) -> str:
    estimate = f", about {event.estimate_s:.0f} s" if event.estimate_s is not None else ""
    return (f"Waiting for a free worker: {event.position} of {event.waiting} in the queue{estimate} "
            f"({event.workers} worker{'s' if event.workers != 1 else ''} busy) …")


def stream_video(runtime: Runtime, session: SessionControl, job: StreamJob, note: str = "",
                 branch_of: int | None = None) -> Iterator[tuple]:
    """Yields (segment, preview, status, final mp4, seed, extended prompt, timeline, run number, drift rows) as each
    block arrives from the backend, stores the video in the session's folder, keeps its blocks for branches (a branch job of
    run `branch_of` starts with that run's kept blocks) and appends the run's metrics when it ends (done, stopped,
    failed or its worker lost)."""
    info = runtime.info
    if not info.loaded:
        raise UserError(info.load_error or "The model is not loaded.")
    if not session.is_waiting:  # (a caller that did not announce the request: fresh stop flag and switches)
        session.request_sent()
    loras = (LoraChoice(job.lora, job.lora_strength),) if job.lora else ()
    request = GenerationRequest(job.prompt, seed=job.seed, num_blocks=job.num_blocks, height=job.height,
                                width=job.width, loras=loras, continuous=job.continuous, fast_decode=job.fast_decode,
                                strength=job.strength, drift_guard=job.drift_guard)
    try:  # (before it queues: the backend checks again with the model itself)
        validated = validate_request(request, info.config, info.fast_decoder, info.fp8_linears)
        runtime.check_cost(validated.num_blocks, validated.height, validated.width, job.continuous)
    except (RequestError, ValueError) as err:
        raise UserError(str(err)) from err
    num_blocks, fps = validated.num_blocks, job.fps
    recorder = StreamRecorder(session.new_run_dir(), fps)
    number, node = session.run_count, None
    fast_run = FastRun(recorder.run_dir, fps) if job.fast_decode and not job.continuous else None
    run = RunRecord(tab=job.tab, model=info.config.name, device=info.device,
                    resolution=f"{validated.width}x{validated.height}", blocks=num_blocks, profile=info.profile)
    length = f"continuous, up to {runtime.config.continuous_minutes:g} min of video" if job.continuous else \
        f"{num_blocks} blocks"
    yield StreamUpdate(gr.skip(), gr.skip(), f"Starting: {length} …{note}", None, job.seed, timeline="",
                       drift=DriftPlot().frame()).as_tuple()
    status, block_s, total_block_s = "", 0.0, 0.0
    cap_minutes = runtime.config.continuous_minutes

    def progress(block: int) -> str:
        """'Block 3/7', or for a continuous run the video made so far and its cap."""
        if not job.continuous:
            return f"Block {block}/{num_blocks}"
        return f"{recorder.frames / fps:.0f} s of video (stops at {cap_minutes:g} min)"
    timeline, drift = PromptTimeline(), DriftPlot()
    sent, started_at, final, lost, waited = time.perf_counter(), None, None, None, False
    restored_frames, restored_s = 0, 0.0  # a branch's kept blocks: not part of its speed
    menu_shown = False  # the branch panel lists this run from its first streamed block
    with contextlib.ExitStack() as running:
        try:
            for event in runtime.backend.stream(job, session.stop_requested.is_set, session.steering):
                if isinstance(event, Waiting):
                    waited = True
                    yield StreamUpdate.status_only(waiting_status(event))
                elif isinstance(event, Refused):
                    run.failed = "refused" if started_at is not None else None
                    raise UserError(event.message)
                elif isinstance(event, Started):
                    running.enter_context(session.running())
                    node = session.runs.start_branch(number, branch_of, job.branch) if job.branch is not None else \
                        session.runs.start(number, job, event.prompt)
                    started_at = time.perf_counter()
                    num_blocks = run.blocks = event.num_blocks  # (as the backend resolved it: a video's length)
                    run.queue_wait_s, run.worker = started_at - sent, event.worker
                    note += event.note + (f" · worker {event.worker}" if runtime.backend.pooled else "")
                    box = gr.skip()
                    if event.extended is not None:
                        session.extended_from[job.tab] = job.prompt.strip()
                        box = event.extended
                    if waited or event.extended is not None or event.note:  # (else "Starting" stands)
                        yield StreamUpdate(gr.skip(), gr.skip(), f"Starting: {length} …{note}", None, job.seed, box,
                                           timeline="").as_tuple()
                elif isinstance(event, Block):
                    segment = recorder.add_block(event.segment, event.mp4, event.frames)
                    kept_note = session.runs.add(node, event)
                    note += f" · {kept_note}" if kept_note else ""
                    if fast_run is not None and event.latents is not None:
                        fast_run.latents.append(event.latents)
                    timeline_update = gr.skip()
                    if event.complete:
                        run.blocks_done += 1
                        timeline.add(run.blocks_done, event.prompt, event.switch_ms, event.refreshed)
                        timeline_update = timeline.markdown() if timeline.worth_showing else gr.skip()
                        drift.add(run.blocks_done, event.drift)
                    if event.restored:  # (a branch's kept blocks: into its mp4, not its live stream)
                        restored_frames, restored_s = recorder.frames, event.elapsed_s
                        if event.complete:
                            yield StreamUpdate.status_only(f"Branch: kept block {run.blocks_done} restored …")
                        continue
                    run.server_first_frame_s = run.server_first_frame_s or event.elapsed_s
                    block_s += event.block_s
                    run.fps = (recorder.frames - restored_frames) / (event.elapsed_s - restored_s)
                    if event.complete:
                        total_block_s += block_s
                        run.ms_per_block = total_block_s * 1e3 / run.blocks_done
                        status = (f"{progress(run.blocks_done)} · {block_s * 1e3:.0f} ms/block · "
                                  f"{run.fps:.1f} FPS · {recorder.frames} frames · "
                                  f"first frame after {run.server_first_frame_s:.2f} s (server)")
                        block_s = 0.0
                    else:
                        status = (f"{progress(event.index + 1)} · "
                                  f"first frame after {run.server_first_frame_s:.2f} s (server)")
                    if event.window_forced:
                        status += f" · rolling window of {event.window_frames} latent frames (memory budget)"
                    status += note
                    yield StreamUpdate(str(segment), Image.open(io.BytesIO(event.preview)), status, None, job.seed,
                                       timeline=timeline_update, run=number if not menu_shown else gr.skip(),
                                       drift=drift.frame() if event.complete else gr.skip()).as_tuple()
                    menu_shown = True
                elif isinstance(event, Finished):
                    final = recorder.finish(event.mp4, event.record)
                    run.peak_gpu_bytes = event.peak_gpu_bytes
                    if node is not None:
                        node.video = final
        except WorkerLost as err:
            if started_at is None:  # (the queue was full, or no worker could take it)
                raise UserError(str(err)) from err
            run.failed, lost = "worker lost", str(err)
            final, kept_frames = recorder.salvage()
        except (GeneratorExit, UserError):  # (GeneratorExit: the browser went away; the run stops, like a Stop)
            raise
        except BaseException as err:
            run.failed = run.failed or type(err).__name__
            raise
        finally:
            if node is not None:
                node.done = True
            session.fast_run = fast_run if fast_run is not None and fast_run.latents else None
            run.cancelled = started_at is not None and run.blocks_done < num_blocks and not run.failed
            run.busy_s = time.perf_counter() - started_at if started_at is not None else None
            run.browser_first_frame_s = session.browser_first_frame_s
            if started_at is not None or run.failed:
                runtime.metrics.record(run)
    timeline_text = timeline.markdown() if timeline.worth_showing else ""
    if started_at is None:
        yield StreamUpdate.status_only("Stopped before it started.")
        return
    if lost is not None:
        kept = f" The first {kept_frames / fps:.0f} s already streamed ({kept_frames} frames) are in the mp4." \
            if final else " Nothing of it could be kept."
        yield StreamUpdate(gr.skip(), gr.skip(), f"**{lost}**{kept}", str(final) if final else None, job.seed,
                           timeline=timeline_text, run=number, drift=drift.frame()).as_tuple()
        return
    done = "Done."
    if run.cancelled:
        done = "Stopped." if job.continuous else f"Stopped after block {run.blocks_done}/{num_blocks}."
    # (the last update carries the timeline too: a predict() caller sees only this one)
    yield StreamUpdate(gr.skip(), gr.skip(), f"{done} {status}", str(final) if final else None, job.seed,
                       timeline=timeline_text, run=number, drift=drift.frame()).as_tuple()


def redecode_with_vae(runtime: Runtime, session: SessionControl) -> tuple[str, str]:
    """(mp4 path, status): the session's last fast-decoded video decoded again with the full Wan VAE."""
    run = session.fast_run
    if run is None or not runtime.info.loaded:
        raise UserError("Nothing to re-decode: generate a video with the fast decoder first (continuous runs "
                        "are not kept).")
    path = run.run_dir / "video_full_vae.mp4"
    data, frames = runtime.backend.redecode(run.latents, run.fps)
    path.write_bytes(data)
    return str(path), f"Re-decoded with the full Wan VAE: {frames} frames."
