"""The process-wide, read-only model runtime: config, weights and the one pipeline core."""
from __future__ import annotations

import gc
import hmac
import logging
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from pipelines.builder import build_pipeline, default_device, vram_bytes
from pipelines.config import PROJECT_ROOT, PipelineConfig, display_path, load_config
from pipelines.core import BlockResult, StreamingVideoPipeline, ValidatedRequest
from pipelines.loading.lora import LoraChoice
from pipelines.loading.prompt_extender import PromptExtender, extender_device, find_extender_folder
from pipelines.loading.weights import WeightsError
from pipelines.memory.planner import MemoryPlan, configure_memory
from pipelines.pose.animation import PoseAnimator, make_pose_animator
from pipelines.registry import REGISTRY, KnownModel, load_registry, present_models
from pipelines.weights_inspector import Report, inspect_folder

from .metrics import RunMetrics
from .outputs import OutputStore
from .session import SessionControl
from .zerogpu import gpu_generator, on_zero_gpu

log = logging.getLogger(__name__)
NO_LORA = "none"

HF_PREFIX = "hf://"


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
class Runtime:
    config: PipelineConfig
    device: str
    pipeline: StreamingVideoPipeline | None = None
    load_error: str | None = None
    memory_plan: MemoryPlan | None = None
    poser: PoseAnimator | None = None
    extender: PromptExtender | None = None
    weights_report: Report | None = None  # what the weights inspector found in the weights folder
    lora_dir: Path | None = None  # <weights>/loras: the LoRAs users can choose
    outputs: OutputStore | None = None  # None: each session writes to its own temporary folder
    admin_token: str | None = None  # lets the holder change server-wide settings from the UI/API
    max_pixel_blocks: int | None = None  # operator's cap on width x height x blocks of a fixed-length request
    weights_dir: Path | None = None
    build_options: dict = field(default_factory=dict)  # build_pipeline's options (profile, vram, compile, KV, ...)
    registry: dict[str, KnownModel] = field(default_factory=dict)  # known causal generators
    metrics: RunMetrics = field(default_factory=RunMetrics)
    gpu_lock: threading.Lock = field(default_factory=threading.Lock)
    _gpu_generate: Callable | None = field(default=None, repr=False)
    _sessions: weakref.WeakSet = field(default_factory=weakref.WeakSet, repr=False)  # live visitors' sessions

    def new_session(self) -> SessionControl:
        """A visitor's own SessionControl (gr.State's factory); the runtime only counts who waits."""
        session = SessionControl(self.outputs)
        self._sessions.add(session)
        return session

    def queue_length(self) -> int:
        """Generation requests sent and not started yet (waiting for the GPU)."""
        return sum(session.is_waiting for session in list(self._sessions))

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
        if not 0 <= float(strength) <= 2:
            raise ValueError(f"LoRA strength must be between 0 and 2, got {strength}.")
        if not name or name == NO_LORA:
            return ()
        if name not in self.lora_names():
            raise ValueError(f"No LoRA named {name!r} in {self.lora_dir or '<weights>/loras'}.")
        return (LoraChoice(str(self.lora_dir / name), float(strength)),)

    def generate_blocks(self, request: ValidatedRequest, cancel: Callable[[], bool]) -> Iterator[BlockResult]:
        """The pipeline core's blocks; on a ZeroGPU Space inside a spaces.GPU call sized to the request
        (there the caller's stop check between blocks ends the call)."""
        if not on_zero_gpu():
            return self.pipeline.generate(request, cancel=cancel)
        if self._gpu_generate is None:
            self._gpu_generate = gpu_generator(self.pipeline.generate, lambda req: self.pipeline.validate(req).num_blocks)
        return self._gpu_generate(request)

    def extend_prompt(self, prompt: str) -> str:
        """Runs the extender where the memory plan leaves room (raises ExtenderError)."""
        assert self.extender is not None and self.pipeline is not None
        profile = self.memory_plan.profile.name if self.memory_plan else None
        # On ZeroGPU the main process has no GPU: the extender runs on the CPU there.
        device = torch.device("cpu") if on_zero_gpu() else extender_device(self.pipeline.device, profile)
        with self.gpu_lock:
            return self.extender.extend(prompt, device)

    def _check_admin(self, token: str | None, what: str) -> None:
        if self.admin_token is None or not hmac.compare_digest(str(token or ""), self.admin_token):
            raise PermissionError(f"{what} needs the operator's admin token.")

    def available_models(self) -> list[KnownModel]:
        """Registered models whose files are all in the weights folder."""
        return present_models(self.weights_dir, self.registry)

    def switch_model(self, key: str, token: str | None = None) -> str:
        """Replaces the resident model for every user (after a running generation), freeing the old
        one first so that only one is ever in memory. Admin token only; PermissionError otherwise,
        WeightsError (nothing changed but the old model being unloaded) when the new one fails."""
        self._check_admin(token, "Switching the model")
        choices = {model.key: model for model in self.available_models()}
        if key not in choices:
            raise ValueError(f"{key!r} is not a model present in the weights folder "
                             f"(present: {', '.join(choices) or 'none'}).")
        with self.gpu_lock:
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
        return self.banner()

    def set_memory_profile(self, requested: str, token: str | None = None) -> str:
        """Re-plans and moves the weights for every user (waits for a running generation to finish).

        Server-wide, so only with the operator's admin token; PermissionError otherwise.
        """
        self._check_admin(token, "Changing the memory profile")
        if self.pipeline is None:
            return self.banner()
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

    @property
    def fast_decoder_available(self) -> bool:
        return self.pipeline is not None and self.pipeline.fast_decoder is not None

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

    def check_cost(self, num_blocks: int, height: int, width: int, continuous: bool) -> None:
        """Refuses (ValueError) a fixed-length request past the operator's cap on width x height x blocks
        (continuous runs are bounded by the config's continuous_minutes instead)."""
        cap = self.max_pixel_blocks
        if cap is None or continuous or width * height * num_blocks <= cap:
            return
        fitting = max(0, cap // (width * height))
        raise ValueError(f"This server generates at most {cap:,} pixels x blocks per video: {width}x{height} allows "
                         f"{fitting} block{'s' if fitting != 1 else ''}" + (" (choose a smaller size)" if not fitting
                                                                          else "") + ".")

    def public(self, message: str) -> str:
        """A message for the page: the server's weights folder shown as <weights>, the project as '.'."""
        if self.weights_dir is not None:
            message = message.replace(str(Path(self.weights_dir).expanduser().resolve()), "<weights>")
            message = message.replace(str(self.weights_dir), "<weights>")
        return message.replace(str(PROJECT_ROOT) + "/", "")

    def banner(self) -> str:
        verdict = self.weights_verdict()
        if self.pipeline is None:
            return f"**Model not loaded:** {self.load_error}{verdict}"
        text = f"**Model:** {self.pipeline.components.description} · **device:** {self.device}"
        if self.memory_plan is not None:
            text += f" · {self.memory_plan.summary()}"
        if self.pipeline.settings.attention != "sdpa":
            text += " · attention: FlashAttention-4 or SDPA, the faster per shape"
        if self.pipeline.settings.fp8_linears:
            text += " · **FP8 linear layers (experimental):** frames differ slightly from the bf16 model"
        if self.config.demo.note:
            text += f" · {self.config.demo.note}"
        return text + verdict


def load_runtime(config_path: str | Path | None, weights: str | None, device: str | None = None,
                 compile_models: bool = False, use_ema: bool | None = None, memory_profile: str = "auto",
                 vram_gb: float | None = None, prompt_extender: str | None = None,
                 outputs: OutputStore | None = None, admin_token: str | None = None,
                 kv_cache: str = "auto", registry: Path = REGISTRY, compile_cache: str | None = None,
                 attention: str = "auto", fp8: bool = False, max_pixel_blocks: int | None = None) -> Runtime:
    """Loads once at start-up; a weights problem is kept as a message for the UI, not raised.

    Weights are read into CPU memory first; the memory plan then decides what goes to the GPU.
    """
    config = load_config(config_path, **{"weights.use_ema": use_ema})  # None: the config decides
    runtime = Runtime(config=config, device=device or default_device(),
                      outputs=outputs, admin_token=admin_token or None, max_pixel_blocks=max_pixel_blocks,
                      metrics=RunMetrics(outputs.metrics_path if outputs else None),
                      registry=load_registry(registry),
                      build_options=dict(memory_profile=memory_profile, vram=vram_bytes(vram_gb),
                                         compile_models=compile_models, kv_cache=kv_cache,
                                         compile_cache=compile_cache, attention=attention, fp8=fp8))
    try:
        weights_dir = runtime.weights_dir = resolve_weights_source(weights)
        runtime.weights_report = inspect_weights(weights_dir)
        runtime.pipeline, runtime.memory_plan = build_pipeline(config, weights_dir, runtime.device, warm=True,
                                                               **runtime.build_options)
    except WeightsError as err:
        log.error("%s", err)
        runtime.load_error = str(err)
        return runtime
    runtime.poser = make_pose_animator(runtime.pipeline, weights_dir)
    runtime.lora_dir = weights_dir / "loras" if weights_dir else None
    folder = find_extender_folder(weights_dir, prompt_extender)
    runtime.extender = PromptExtender(folder) if folder is not None else None
    return runtime


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
