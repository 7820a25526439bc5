"""The model side of a server or of one pool worker: weights, memory plan, pose tools, prompt extender, LoRAs,
and `run()`, which turns a StreamJob into StreamEvents through the one pipeline core."""
from __future__ import annotations

import dataclasses
import gc
import io
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from pipelines.builder import build_pipeline, default_device, vram_bytes
from pipelines.config import PipelineConfig, display_path, load_config
from pipelines.core import BlockResult, GenerationRequest, RequestError, StreamingVideoPipeline, ValidatedRequest
from pipelines.loading.lora import LoraChoice
from pipelines.loading.media import MediaError, load_image, read_video
from pipelines.loading.prompt_extender import ExtenderError, PromptExtender, extender_device, find_extender_folder
from pipelines.loading.video_io import write_video
from pipelines.loading.weights import WeightsError
from pipelines.memory.planner import MemoryPlan, configure_memory
from pipelines.pose.animation import PoseAnimator, make_pose_animator
from pipelines.registry import REGISTRY, KnownModel, load_registry, present_models
from pipelines.run_record import RunRecorder, RunRecordError, parse_record, replay_request
from pipelines.steering import PromptSteering
from pipelines.video_input import FrameList
from pipelines.weights_inspector import Report, inspect_folder

from .encoding import BlockEncoder
from .jobs import Block, Finished, Refused, Started, StreamEvent, StreamJob
from .zerogpu import gpu_generator, on_zero_gpu

log = logging.getLogger(__name__)
NO_LORA = "none"
HF_PREFIX = "hf://"


@dataclass(frozen=True)
class EngineInfo:
    """What a front end shows and checks about the model a backend runs (picklable: a pool worker sends it)."""

    config: PipelineConfig
    banner: str
    loaded: bool
    load_error: str | None
    memory_summary: str
    profile: str | None
    device: str
    fast_decoder: bool
    fp8_linears: bool
    extender: bool
    extender_note: str
    lora_menu: tuple[tuple[str, str], ...]
    lora_note: str
    pose_missing: str | None  # why pose animation cannot run with this model (None: it can)
    detector_missing: str | None  # what DWPose still needs for real driving videos
    weights_report: str | None  # the inspector's markdown of the weights folder
    weights_runnable: bool

    @property
    def lora_names(self) -> list[str]:
        return [name for _, name in self.lora_menu]


def offered_lora(name: str | None, strength: float, offered: list[str]) -> str | None:
    """The LoRA file name a request may use (None for no LoRA); ValueError for a name not offered or a strength out
    of range. The front end checks with it before a request queues, the engine again with its own folder."""
    if not 0 <= float(strength) <= 2:
        raise ValueError(f"LoRA strength must be between 0 and 2, got {strength}.")
    if not name or name == NO_LORA:
        return None
    if name not in offered:
        raise ValueError(f"No LoRA named {name!r} in <weights>/loras.")
    return name


def resolve_weights_source(source: str | None, cache_dir: str | Path | None = None) -> Path | None:
    """A local folder is used as is; 'hf://owner/repo' is downloaded once into cache_dir (Spaces)."""
    if not source:
        return None
    if not source.startswith(HF_PREFIX):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise WeightsError(f"Weights folder {path} does not exist.")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id = source[len(HF_PREFIX):]
    target = Path(cache_dir or os.environ.get("SF_WEIGHTS_CACHE", "~/.cache/self-forcing-weights")).expanduser()
    try:
        return Path(snapshot_download(repo_id=repo_id, local_dir=target / repo_id.replace("/", "--")))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise WeightsError(f"Could not download {repo_id} from the Hugging Face Hub: {err}") from err


@dataclass
class Engine:
    config: PipelineConfig
    device: str
    pipeline: StreamingVideoPipeline | None = None
    load_error: str | None = None
    memory_plan: MemoryPlan | None = None
    poser: PoseAnimator | None = None
    extender: PromptExtender | None = None
    weights_report: Report | None = None  # what the weights inspector found in the weights folder
    lora_dir: Path | None = None  # <weights>/loras: the LoRAs users can choose
    weights_dir: Path | None = None
    build_options: dict = field(default_factory=dict)  # build_pipeline's options (profile, vram, compile, KV, ...)
    registry: dict[str, KnownModel] = field(default_factory=dict)  # known causal generators
    gpu_lock: threading.Lock = field(default_factory=threading.Lock)  # one run (or model change) at a time
    _gpu_generate: Callable | None = field(default=None, repr=False)

    # -- what the front end shows

    @property
    def extender_note(self) -> str:
        """Why the Extend prompt option is off, or which model it uses."""
        if self.extender is not None:
            return f"Rewrites a short prompt into a detailed caption with {self.extender.folder.name} (greedy, cached)."
        return ("No prompt extender: put an instruction-tuned causal LM (e.g. Qwen/Qwen2.5-1.5B-Instruct) in "
                "<weights>/prompt_extender/ or pass --prompt-extender DIR.")

    @property
    def lora_note(self) -> str:
        """Where the LoRA menu's files come from (and how to give some when there are none)."""
        if self.lora_dir is None:
            return "start the app with --weights DIR and put LoRA files in DIR/loras/ to choose one here"
        return "from <weights>/loras/" if self.lora_names() else "none found in <weights>/loras/"

    def lora_names(self) -> list[str]:
        if self.lora_dir is None or not self.lora_dir.is_dir():
            return []
        report = self.weights_report  # (the start-up inspection's unusable files are not offered)
        unusable = {Path(report.folder, f.path).resolve() for f in report.findings if not f.supported} \
            if report is not None else set()
        return sorted(p.name for p in self.lora_dir.glob("*.safetensors") if p.resolve() not in unusable)

    def lora_menu(self) -> list[tuple[str, str]]:
        """(label, name) per LoRA: the label adds what the file says it was trained for."""
        from pipelines.loading.lora import provenance

        return [(f"{name} ({trained})" if (trained := provenance(self.lora_dir / name)) else name, name)
                for name in self.lora_names()]

    def lora_choice(self, name: str | None, strength: float) -> tuple[LoraChoice, ...]:
        """The request's LoRA from a name in <weights>/loras (nothing else on the server can be named)."""
        name = offered_lora(name, strength, self.lora_names())
        return () if name is None else (LoraChoice(str(self.lora_dir / name), float(strength)),)

    @property
    def fast_decoder_available(self) -> bool:
        return self.pipeline is not None and self.pipeline.fast_decoder is not None

    def available_models(self) -> list[KnownModel]:
        """Registered models whose files are all in the weights folder."""
        return present_models(self.weights_dir, self.registry)

    def weights_verdict(self) -> str:
        """What the weights folder holds, for the banner: the inspector's verdict, except that a folder of LoRAs
        (or anything else no model runs from) beside a model that runs is not reported as a failure."""
        report = self.weights_report
        if report is None:
            return ""
        shown = display_path(report.folder)
        if self.pipeline is not None and not report.runnable:
            loras = self.lora_names()
            held = f"{len(loras)} LoRA file{'s' if len(loras) != 1 else ''} for the loaded model" if loras else \
                "no other video model"
            return f" · weights folder `{shown}`: {held}"
        return f" · **Weights folder:** {report.verdict().replace(report.folder, shown)}"

    def banner(self) -> str:
        verdict = self.weights_verdict()
        if self.pipeline is None:
            return f"**Model not loaded:** {self.load_error}{verdict}"
        text = f"**Model:** {self.pipeline.components.description} · **device:** {self.device}"
        if self.memory_plan is not None:
            text += f" · {self.memory_plan.summary()}"
        if self.pipeline.parallel is not None:
            layout = self.pipeline.parallel.layout
            text += f" · **{layout.gpus} GPUs:** {layout.describe()}"
        if self.pipeline.settings.attention != "sdpa":
            text += " · attention: FlashAttention-4 or SDPA, the faster per shape"
        if self.pipeline.settings.fp8_linears:
            text += " · **FP8 linear layers (experimental):** frames differ slightly from the bf16 model"
        if self.config.demo.note:
            text += f" · {self.config.demo.note}"
        return text + verdict

    def info(self) -> EngineInfo:
        poser = self.poser
        pose_missing = self.load_error or "The model is not loaded." if poser is None else \
            None if poser.encoders.available else poser.encoders.missing_message()
        return EngineInfo(
            config=self.config, banner=self.banner(), loaded=self.pipeline is not None, load_error=self.load_error,
            memory_summary=self.memory_plan.summary() if self.memory_plan else "",
            profile=self.memory_plan.profile.name if self.memory_plan else None, device=str(self.device),
            fast_decoder=self.fast_decoder_available,
            fp8_linears=self.pipeline is not None and self.pipeline.settings.fp8_linears,
            extender=self.extender is not None, extender_note=self.extender_note,
            lora_menu=tuple(self.lora_menu()), lora_note=self.lora_note, pose_missing=pose_missing,
            detector_missing=poser.detector_missing() if poser is not None else None,
            weights_report=self.weights_report.markdown() if self.weights_report is not None else None,
            weights_runnable=self.pipeline is not None)

    # -- running a job

    def run(self, job: StreamJob, cancel: Callable[[], bool], steering: PromptSteering) -> Iterator[StreamEvent]:
        """The job's stream: Started, a Block per decoded block, Finished (or Refused). Holds the model for the
        whole run; `cancel` is checked between blocks and `steering` carries prompt switches."""
        with self.gpu_lock:
            if self.pipeline is None:
                yield Refused(self.load_error or "The model is not loaded.")
                return
            try:
                request, extended, note = self._request(job, steering)
                # (a replay follows its record's prompt switches, not live ones)
                validated = self.pipeline.validate(dataclasses.replace(request, steering=request.steering or steering))
            except (RequestError, MediaError, WeightsError, ValueError) as err:
                yield Refused(str(err))
                return
            note += self._truncation_note(validated.request.prompt)
            fast_path = self.pipeline.fast_path_note(validated.request)
            note += f" · {fast_path}" if fast_path else ""
            yield Started(validated.num_blocks, validated.height, validated.width, request.seed, request.prompt,
                          extended, note, worker_pid=os.getpid())
            yield from self._blocks(validated, job, cancel)

    def _blocks(self, validated: ValidatedRequest, job: StreamJob, cancel: Callable[[], bool]) -> Iterator[StreamEvent]:
        pipeline = self.pipeline
        cuda = pipeline.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(pipeline.device)
        encoder = BlockEncoder(job.fps)
        record = RunRecorder(pipeline, validated, job.tab)
        recorded_blocks = len(json.loads(job.replay)["blocks"]) if job.replay is not None else None

        def stop() -> bool:  # (a replayed run ends where the recorded one ended)
            return cancel() or (recorded_blocks is not None and len(record.record["blocks"]) >= recorded_blocks)

        try:
            for result in self.generate_blocks(validated, stop):
                record.add(result)
                segment, mp4, preview = encoder.encode(result.frames, live=not result.restored)
                yield Block(result.index, result.num_blocks, result.complete, len(result.frames), segment, mp4,
                            preview, result.elapsed_s, result.block_s, result.prompt, result.switch_ms,
                            result.window_frames, result.window_forced, result.latents, result.switch_mode,
                            result.reseed, result.rng_state, result.restored,
                            result.drift.as_dict() if result.drift is not None else None, result.refreshed)
                if result.complete and stop():
                    break  # (the core checks too; this ends a ZeroGPU call, which cannot see the flag)
            tail = encoder.finish()
        except RequestError as err:  # (a LoRA file that cannot be merged is found when the run starts)
            yield Refused(str(err))
            return
        except torch.cuda.OutOfMemoryError as err:
            log.warning("out of GPU memory: %s", str(err).splitlines()[0])
            yield Refused("Out of GPU memory. Try fewer blocks or a lower resolution.")
            return
        finally:
            encoder.close()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        yield Finished(tail, torch.cuda.max_memory_allocated(pipeline.device) if cuda else None, record.json())

    def _request(self, job: StreamJob, steering: PromptSteering) -> tuple[GenerationRequest, str | None, str]:
        """(the GenerationRequest a job describes, the extender's text or None, a note for the page)."""
        if job.replay is not None:
            return self._replay_request(job.replay), None, " · replaying a run record"
        request = GenerationRequest(prompt=job.prompt or "", negative_prompt=job.negative_prompt, seed=job.seed,
                                    num_blocks=job.num_blocks, height=job.height, width=job.width,
                                    continuous=job.continuous, fast_decode=job.fast_decode,
                                    drift_guard=job.drift_guard, loras=self.lora_choice(job.lora, job.lora_strength))
        if job.tab == "i2v":
            if not job.image:
                raise RequestError("Please upload an image.")
            request.image = load_image(io.BytesIO(job.image))
        extended, note = None, ""
        if job.extend and request.prompt.strip() and self.extender is not None:
            try:
                extended = self.extend_prompt(request.prompt.strip())
                request.prompt = extended
            except ExtenderError as err:
                log.warning("%s", err)
                note = f" · prompt extension failed ({err}); used the prompt as typed"
        if job.tab == "pose":
            request = self._pose_request(job, request)
        if job.tab == "v2v":
            request = self._video_request(job, request)
        if job.branch is not None:
            request = job.branch.request(request, steering)
            note += f" · branch from block {job.branch.block + 1}"
        return request, extended, note

    def _replay_request(self, text: str) -> GenerationRequest:
        """The request a run record describes, with its LoRAs from <weights>/loras (RequestError otherwise)."""
        try:
            record = parse_record(text)
            if record.get("image") is not None:
                raise RequestError("An image-to-video record replays with its image: python -m pipelines.cli "
                                   "--replay RUN.json --image IMAGE.")
            loras = [self.lora_dir / lora["name"] for lora in record["loras"]] if self.lora_dir else []
            return replay_request(record, self.pipeline, loras=loras)
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # (RunRecordError is a ValueError)
            message = str(err) if isinstance(err, (RequestError, RunRecordError)) else \
                f"This is not a run record ({type(err).__name__})."
            raise RequestError(message) from err

    def _pose_request(self, job: StreamJob, base: GenerationRequest) -> GenerationRequest:
        poser = self.poser
        if poser is None:
            raise RequestError(self.load_error or "The model is not loaded.")
        if not poser.encoders.available:
            raise RequestError(poser.encoders.missing_message())
        if job.camera is not None and job.reference:  # live: the poses as the blocks need them, until Stop
            return poser.live_request(load_image(io.BytesIO(job.reference)), job.camera, job.is_pose_video, base)
        if not job.reference or not job.driving_video:
            raise RequestError("Please upload a reference image and a driving video.")
        if job.continuous:
            raise RequestError("Continuous mode is for text and image to video: a pose animation lasts as long as "
                               "its driving video.")
        reference = load_image(io.BytesIO(job.reference))
        with tempfile.NamedTemporaryFile(suffix=".mp4") as video:
            video.write(job.driving_video)
            video.flush()
            frames = read_video(video.name)
        return poser.request(reference, frames, job.is_pose_video, base)

    def _video_request(self, job: StreamJob, base: GenerationRequest) -> GenerationRequest:
        """Video-to-video: the input file's frames at the model's frame rate, block by block."""
        if job.camera is not None:
            return dataclasses.replace(base, source=job.camera, strength=float(job.strength))
        if not job.source_video:
            raise RequestError("Please upload an input video.")
        with tempfile.NamedTemporaryFile(suffix=".mp4") as video:
            video.write(job.source_video)
            video.flush()
            frames = read_video(video.name, fps=self.config.fps)
        return dataclasses.replace(base, source=FrameList(frames), strength=float(job.strength))

    def _truncation_note(self, prompt: str) -> str:
        encoder = self.pipeline.prompt_encoder
        tokens = encoder.token_count(prompt)
        if tokens <= encoder.text_len:
            return ""
        return f" · prompt cut to its first {encoder.text_len} of {tokens} tokens (the text encoder's limit)"

    def generate_blocks(self, request: ValidatedRequest, cancel: Callable[[], bool]) -> Iterator[BlockResult]:
        """The pipeline core's blocks; on a ZeroGPU Space inside a spaces.GPU call sized to the request
        (there the caller's stop check between blocks ends the call)."""
        if not on_zero_gpu():
            return self.pipeline.generate(request, cancel=cancel)
        if self._gpu_generate is None:
            self._gpu_generate = gpu_generator(self.pipeline.generate, lambda req: self.pipeline.validate(req).num_blocks)
        return self._gpu_generate(request)

    def extend_prompt(self, prompt: str) -> str:
        """Runs the extender where the memory plan leaves room (raises ExtenderError); the caller holds gpu_lock."""
        assert self.extender is not None and self.pipeline is not None
        profile = self.memory_plan.profile.name if self.memory_plan else None
        # On ZeroGPU the main process has no GPU: the extender runs on the CPU there.
        device = torch.device("cpu") if on_zero_gpu() else extender_device(self.pipeline.device, profile)
        return self.extender.extend(prompt, device)

    def redecode(self, latents: list[torch.Tensor], fps: int) -> tuple[bytes, int]:
        """(mp4 bytes, frames) of a fast-decoded run's latents decoded again with the full Wan VAE."""
        if self.pipeline is None:
            raise RequestError(self.load_error or "The model is not loaded.")
        with self.gpu_lock, tempfile.TemporaryDirectory(prefix="sf-redecode-") as folder:
            path = Path(folder, "video.mp4")
            frames = write_video(path, self.pipeline.decode_with_vae(latents), fps, progressive=True)
            return path.read_bytes(), frames

    # -- server-wide changes (the front end checks who may make them)

    def switch_model(self, key: str) -> None:
        """Replaces the resident model (after a running generation), freeing the old one first so that only one
        is ever in memory. WeightsError (nothing changed but the old model being unloaded) when the new one
        fails."""
        choices = {model.key: model for model in self.available_models()}
        if key not in choices:
            raise ValueError(f"{key!r} is not a model present in the weights folder "
                             f"(present: {', '.join(choices) or 'none'}).")
        with self.gpu_lock:
            if self.pipeline is not None and self.pipeline.parallel is not None:
                self.pipeline.parallel.close()  # (the new model starts its own ranks)
            self.pipeline, self.poser, self.memory_plan = None, None, None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            config = choices[key].config
            try:
                self.pipeline, self.memory_plan = build_pipeline(config, self.weights_dir, self.device,
                                                                 warm=True, **self.build_options)
            except WeightsError as err:
                self.load_error = str(err)
                raise
            self.config, self.load_error = config, None
            self.poser = make_pose_animator(self.pipeline, self.weights_dir)
        log.info("switched to %s", config.name)

    def set_memory_profile(self, requested: str) -> str:
        """Re-plans and moves the weights (waits for a running generation to finish); the plan's summary."""
        if self.pipeline is None:
            return ""
        if self.pipeline.parallel is not None:
            raise ValueError("A stream split over GPUs (--gpus) keeps every model resident: its memory profile is "
                             "high.")
        with self.gpu_lock:
            pipeline = self.pipeline
            self.memory_plan, settings = configure_memory(pipeline.components, pipeline.config, pipeline.device,
                                                          requested, self.build_options.get("vram"),
                                                          self.build_options.get("kv_cache", "auto"),
                                                          pipeline.settings)
            self.pipeline = pipeline.with_settings(settings)
            if self.poser is not None:
                self.poser = self.poser.for_pipeline(self.pipeline)
        return self.memory_plan.summary()


def load_engine(config_path: str | Path | None, weights: str | None, device: str | None = None,
                compile_models: bool = False, use_ema: bool | None = None, memory_profile: str = "auto",
                vram_gb: float | None = None, prompt_extender: str | None = None, kv_cache: str = "auto",
                registry: Path = REGISTRY, compile_cache: str | None = None, attention: str = "auto",
                fp8: bool = False, gpus: int = 1, split: str = "auto") -> Engine:
    """Loads once at start-up; a weights problem is kept as a message for the UI, not raised.

    Weights are read into CPU memory first; the memory plan then decides what goes to the GPU.
    """
    config = load_config(config_path, **{"weights.use_ema": use_ema})  # None: the config decides
    engine = Engine(config=config, device=device or default_device(), registry=load_registry(registry),
                    build_options=dict(memory_profile=memory_profile, vram=vram_bytes(vram_gb),
                                       compile_models=compile_models, kv_cache=kv_cache,
                                       compile_cache=compile_cache, attention=attention, fp8=fp8,
                                       gpus=gpus, split=split))
    try:
        weights_dir = engine.weights_dir = resolve_weights_source(weights)
        engine.weights_report = inspect_weights(weights_dir)
        engine.pipeline, engine.memory_plan = build_pipeline(config, weights_dir, engine.device, warm=True,
                                                             **engine.build_options)
    except WeightsError as err:
        log.error("%s", err)
        engine.load_error = str(err)
        return engine
    engine.poser = make_pose_animator(engine.pipeline, weights_dir)
    engine.lora_dir = weights_dir / "loras" if weights_dir else None
    folder = find_extender_folder(weights_dir, prompt_extender)
    engine.extender = PromptExtender(folder) if folder is not None else None
    return engine


def inspect_weights(weights_dir: Path | None) -> Report | None:
    """The inspector's report of the weights folder, logged and kept for the banner (never fatal)."""
    if weights_dir is None:
        return None
    try:
        report = inspect_folder(weights_dir)
    except Exception:  # the inspector only informs: a surprise in an odd folder must not stop the app
        log.exception("could not inspect %s", weights_dir)
        return None
    log.info("weights inspector:\n%s", report.text())
    return report
