"""The app's event handlers, one object per server configured with its runtime (demo/ui.py wires them)."""
from __future__ import annotations

import dataclasses
import functools
import io
from pathlib import Path
from typing import Callable

import gradio as gr
from PIL import Image

from pipelines.loading.media import MediaError, load_image, read_video
from pipelines.loading.weights import WeightsError
from pipelines.run_record import RunRecordError, parse_record
from pipelines.steering import SWITCH_MODES
from serving.jobs import StreamJob

from .branches import BranchError
from .runtime import Runtime
from .session import SessionControl
from .streaming import (
    StreamUpdate,
    UserError,
    choose_extension,
    parse_resolution,
    pick_seed,
    redecode_with_vae,
    stream_video,
    whole_number,
)

MIN_FPS, MAX_FPS = 8, 30


NO_CAMERA_FRAMES = ("**No frames came from the camera.** Allow this page to use it (the browser asks), start its "
                    "stream (*Click to Access Webcam*, then *Record*), then Generate.")


def make_job(tab, prompt, negative, seed, randomize, blocks, resolution, continuous=False, fast_decode=False,
             drift_guard=0.0, **extra) -> StreamJob:
    """The job the shared controls describe (a UserError for values that are not numbers; ranges are checked with the
    request, core.validate_request, before it queues)."""
    height, width = parse_resolution(resolution)
    try:
        guard = float(drift_guard or 0.0)
    except (TypeError, ValueError):
        raise UserError(f"The drift guard must be a number from 0 (off) to 1, got {drift_guard!r}.") from None
    return StreamJob(tab=tab, prompt=prompt or "", negative_prompt=negative, seed=pick_seed(seed, randomize),
                     num_blocks=whole_number(blocks, "Blocks"), height=height, width=width,
                     continuous=bool(continuous), fast_decode=bool(fast_decode), drift_guard=guard or None, **extra)


def upload_bytes(path: str) -> bytes:
    """An upload's file as it came (a pool worker may be on another machine)."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as err:
        raise UserError(f"Could not read the upload ({type(err).__name__}).") from err


class Handlers:
    """What each button, box and API endpoint does; per-visitor state comes in as the SessionControl argument."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    # -- generation (one pipeline core for every tab)

    def text_to_video(self, prompt, negative, seed, randomize, blocks, fps, resolution, extend, extended, lora,
                      lora_strength, continuous, fast_decode, drift_guard, session: SessionControl,
                      browser: gr.Request):
        yield from self._run(session, browser, fps, lambda: make_job(
            "t2v", prompt, negative, seed, randomize, blocks, resolution, continuous, fast_decode, drift_guard),
            (extend, extended, lora, lora_strength))

    def image_to_video(self, image, prompt, negative, seed, randomize, blocks, fps, resolution, extend, extended,
                       lora, lora_strength, continuous, fast_decode, drift_guard, session: SessionControl,
                       browser: gr.Request):
        def job() -> StreamJob:
            if not image:
                raise UserError("Please upload an image.")
            try:
                load_image(image)  # (checked here, before it queues)
            except MediaError as err:
                raise UserError(str(err)) from err
            return make_job("i2v", prompt, negative, seed, randomize, blocks, resolution, continuous, fast_decode,
                            drift_guard, image=upload_bytes(image))

        yield from self._run(session, browser, fps, job, (extend, extended, lora, lora_strength))

    def pose_animation(self, reference, driving_video, is_pose_video, use_camera, prompt, negative, seed, randomize,
                       blocks, fps, resolution, extend, extended, lora, lora_strength, continuous, fast_decode,
                       drift_guard, session: SessionControl, browser: gr.Request):
        """The character of `reference` moved by the driving video's poses; with `use_camera` the poses come from the
        browser's camera as the blocks need them (through DWPose, or as they are when it shows a skeleton), until
        Stop."""
        info = self.runtime.info

        def job() -> StreamJob:
            if info.pose_missing:
                raise UserError(info.pose_missing)
            if use_camera:
                if not reference:
                    raise UserError("Please upload a reference image (the character).")
                try:
                    load_image(reference)
                except MediaError as err:
                    raise UserError(str(err)) from err
                return make_job("pose", prompt, negative, seed, randomize, blocks, resolution, True, fast_decode,
                                drift_guard, reference=upload_bytes(reference), is_pose_video=bool(is_pose_video),
                                camera=session.open_camera())
            if not reference or not driving_video:
                raise UserError("Please upload a reference image and a driving video, or tick the camera.")
            if continuous:
                raise UserError("Continuous mode is for text and image to video: a pose animation lasts as long as "
                                "its driving video.")
            try:  # (checked here, before it queues)
                load_image(reference)
                read_video(driving_video)
            except MediaError as err:
                raise UserError(str(err)) from err
            return make_job("pose", prompt, negative, seed, randomize, blocks, resolution, fast_decode=fast_decode,
                            reference=upload_bytes(reference), driving_video=upload_bytes(driving_video),
                            is_pose_video=bool(is_pose_video))

        yield from self._run(session, browser, fps, job, (extend, extended, lora, lora_strength))

    def video_to_video(self, video, strength, use_camera, prompt, negative, seed, randomize, blocks, fps, resolution,
                       extend, extended, lora, lora_strength, continuous, fast_decode, drift_guard,
                       session: SessionControl, browser: gr.Request):
        """Each block of the input video (at the model's frame rate) restyled under the prompt: `strength` is how much
        of it is replaced by noise (1: the prompt alone). The run ends with the video; with `use_camera` the input is
        the browser's camera, until Stop."""
        def job() -> StreamJob:
            try:
                value = float(strength)
            except (TypeError, ValueError):
                raise UserError(f"Strength must be a number above 0 and at most 1, got {strength!r}.") from None
            if use_camera:
                return make_job("v2v", prompt, negative, seed, randomize, blocks, resolution, True, fast_decode,
                                drift_guard, strength=value, camera=session.open_camera())
            if not video:
                raise UserError("Please upload an input video, or tick the camera.")
            try:  # (checked here, before it queues)
                read_video(video, max_frames=1)
            except MediaError as err:
                raise UserError(str(err)) from err
            return make_job("v2v", prompt, negative, seed, randomize, blocks, resolution, continuous, fast_decode,
                            drift_guard, source_video=upload_bytes(video), strength=value)

        yield from self._run(session, browser, fps, job, (extend, extended, lora, lora_strength))

    def replay_run(self, record_file, fps, session: SessionControl, browser: gr.Request):
        """A run record (run.json beside a video) made again on this server: its prompt, seed, size, LoRAs and
        prompt switches."""
        def job() -> StreamJob:
            if not record_file:
                raise UserError("Please upload a run record (the run.json written beside a video).")
            text = upload_bytes(record_file).decode("utf-8", errors="replace")
            try:
                record = parse_record(text)
                lora = record["loras"][0] if record["loras"] else {"name": None, "strength": 1.0}
                return StreamJob(tab="t2v", prompt=record["prompt"], negative_prompt=record["negative_prompt"],
                                 seed=record["seed"], num_blocks=record["num_blocks"], height=record["height"],
                                 width=record["width"], continuous=record["continuous"],
                                 fast_decode=record["settings"]["fast_decode"], lora=lora["name"],
                                 lora_strength=lora["strength"], replay=text)
            except (RunRecordError, KeyError, TypeError) as err:
                raise UserError(str(err) if isinstance(err, RunRecordError) else
                                f"This is not a run record ({type(err).__name__}).") from err

        yield from self._run(session, browser, fps, job)

    def branch(self, run, block, prompt, mode, new_seed, seed, fps, session: SessionControl, browser: gr.Request):
        """Run `run` again from its block `block` (1-based; the blocks before it are kept) under `prompt` (empty: the
        prompt in force there goes on) and, with `new_seed`, new noise from there (`seed`, random when empty)."""
        try:
            number = whole_number(run, "Run", 1)
        except UserError:
            session.request_done()
            raise

        def job() -> StreamJob:
            if mode not in SWITCH_MODES:
                raise UserError(f"The switch mode must be one of {', '.join(SWITCH_MODES)}, got {mode!r}.")
            new = pick_seed(seed, seed is None or seed == "") if new_seed else None
            try:
                return session.runs.branch(number, whole_number(block, "From block", 1), (prompt or "").strip(),
                                           mode, new)
            except BranchError as err:
                raise UserError(str(err)) from err

        yield from self._run(session, browser, fps, job, branch_of=number)

    def rewind(self, run, block, seed, fps, session: SessionControl, browser: gr.Request):
        """Run `run` again from its block `block` under the same prompt with new noise (`seed`, random when empty)."""
        yield from self.branch(run, block, "", "recache", True, seed, fps, session, browser)

    @staticmethod
    def branch_requested(session: SessionControl) -> None:
        """Runs (unqueued) as the page sends a branch: a run of this session still streaming stops after its block
        (its video and kept blocks stay), and the branch is announced like any request."""
        if session.is_running:
            session.request_stop()
        session.request_sent()

    @staticmethod
    def run_menu(tab: str, number, session: SessionControl):
        """The branch panel's run menu: the session's runs of `tab`, run `number` chosen."""
        choices = session.runs.choices(tab)
        return gr.update(choices=choices, value=number if any(n == number for _, n in choices) else None)

    @staticmethod
    def select_run(run, session: SessionControl) -> tuple:
        """The branch panel for run `run`: the block slider's range, the frame before its value, the tree."""
        node = session.runs.runs.get(run) if isinstance(run, int) else None
        if node is None:
            return gr.update(), None, session.runs.markdown()
        fixed = node.job.num_blocks if not node.job.continuous else None
        last = max(2, fixed or session.runs.last_branch_block(node))
        return gr.update(minimum=2, maximum=max(3, last), value=last), Handlers.block_frame(run, last, session), \
            session.runs.markdown()

    @staticmethod
    def block_frame(run, block, session: SessionControl):
        """The last frame before block `block` of run `run` (what the branch goes on from), None when not kept."""
        node = session.runs.runs.get(run) if isinstance(run, int) else None
        try:
            index = int(block) - 2
        except (TypeError, ValueError):
            return None
        if node is None or not 0 <= index < len(node.previews) or not node.previews[index]:
            return None
        return Image.open(io.BytesIO(node.previews[index]))

    def _run(self, session: SessionControl, browser: gr.Request | None, fps, job, choices: tuple | None = None,
             branch_of: int | None = None):
        """The tab's job (built by `job()`) through the shared streaming handler, unless Stop dropped it while it
        waited. `choices`: the page's (extend, extended prompt, LoRA, strength) for a new run (a replay or branch
        keeps its own)."""
        runtime = self.runtime
        if session.dropped_before_start():
            yield StreamUpdate.status_only("Stopped before it started.")
            return
        try:
            if runtime.outputs is not None and browser is not None and browser.session_hash:
                runtime.outputs.track(browser.session_hash, session.output_dir)
            fps = whole_number(fps, "Output FPS", MIN_FPS, MAX_FPS)
            built = dataclasses.replace(job(), fps=fps)
            if choices is not None:
                extend, extended, lora, strength = choices
                try:
                    lora = runtime.check_lora(lora, strength)
                except (ValueError, TypeError) as err:
                    raise UserError(str(err)) from err
                built = dataclasses.replace(built, lora=lora, lora_strength=float(strength))
                built = choose_extension(runtime, session, built, bool(extend), extended)
            yield from stream_video(runtime, session, built, branch_of=branch_of)
            if built.camera is not None and built.camera.ended_early:
                yield StreamUpdate.status_only(NO_CAMERA_FRAMES if not built.camera.received else
                                               "**The camera stopped sending frames**; the video made so far is kept.")
        except UserError as err:  # (said without the server's paths)
            public = runtime.public(err.message)
            if public == err.message:
                raise
            raise UserError(public) from err
        finally:
            session.request_done()
            session.close_camera()

    @staticmethod
    def camera_frame(frame, session: SessionControl) -> None:
        """A frame of the browser's camera stream (the live input of video-to-video or of the pose animation)."""
        session.camera_frame(frame)

    @staticmethod
    def calm(handler: Callable) -> Callable:
        """`handler` for the page: a refused request says why in the status line (the third output) and leaves the
        other outputs as they are, where an error would mark every output and pop up a toast. API callers keep
        the plain handler and its error."""
        @functools.wraps(handler)
        def on_page(*args):
            try:
                yield from handler(*args)
            except UserError as err:
                yield StreamUpdate.status_only(f"**Not started:** {err.message}")

        return on_page

    def redecode(self, session: SessionControl) -> tuple[str, str]:
        return redecode_with_vae(self.runtime, session)

    # -- while a request waits or runs

    @staticmethod
    def request_sent(session: SessionControl) -> None:
        """Runs (unqueued) as the page sends a generation request, so Stop and new prompts reach it at once."""
        session.request_sent()

    @staticmethod
    def send_unless_running(session: SessionControl) -> None:
        """Enter: ends the Enter chain quietly when it steered the running video instead, else announces the
        request it is about to send."""
        if session.is_running:
            raise gr.Error("applied to the running video", visible=False, print_exception=False)
        session.request_sent()

    @staticmethod
    def steer(prompt: str, mode: str, session: SessionControl) -> str:
        try:
            if session.steer(prompt, mode):
                return f"New prompt ({mode}) from the next block …"
        except ValueError as err:
            raise UserError(str(err)) from err
        return "Nothing is running: press Generate."

    def steer_if_running(self, prompt: str, mode: str, session: SessionControl) -> str:
        return self.steer(prompt, mode, session) if session.is_running else gr.skip()

    @staticmethod
    def request_stop(session: SessionControl) -> str:
        state = session.request_stop()
        if state == "running":
            return "Stopping after the current block …"
        if state == "waiting":
            return "Stopped: the waiting request will not run."
        return "Nothing is running."

    def report_browser_timing(self, seconds: str, session: SessionControl) -> str:
        try:
            value = float(seconds)
        except ValueError:
            return gr.skip()
        session.browser_first_frame_s = value
        self.runtime.metrics.record_browser_first_frame(value)
        return f"First frame on screen **{value:.2f} s** after the click (measured in this browser)"

    # -- operator panels (server-wide, with the admin token)

    def set_memory_profile(self, requested: str, given_token: str) -> str:
        try:
            return self.runtime.set_memory_profile(requested, given_token)
        except (PermissionError, ValueError) as err:
            raise UserError(str(err)) from err

    def switch_model(self, key: str, given_token: str) -> tuple[str, str]:
        try:
            return self.runtime.switch_model(key, given_token), models_markdown(self.runtime)
        except (PermissionError, ValueError, WeightsError) as err:
            raise UserError(str(err)) from err

    def end_session(self, browser: gr.Request) -> None:
        if self.runtime.outputs is not None:
            self.runtime.outputs.end_session(browser.session_hash)


def models_markdown(runtime: Runtime) -> str:
    """The registered causal generators: which is loaded, which are present, what the others miss."""
    current = Path(runtime.config.source).resolve()
    rows = ["| model | sampling | in the weights folder |", "| --- | --- | --- |"]
    for model in runtime.registry.values():
        missing = model.missing(runtime.weights_dir) if runtime.weights_dir else ["--weights DIR"]
        state = "**loaded**" if model.config_path.resolve() == current else "present" if not missing else \
            f"missing {', '.join(missing)} (`{model.config.download}`)"
        rows.append(f"| {model.label} | {model.settings()} | {state} |")
    return "\n".join(rows)
