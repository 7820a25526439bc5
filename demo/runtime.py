"""The front end's view of the server: where streams run (a backend), what the model offers (EngineInfo),
and what only the front end holds (session folders, metrics, the operator's limits and token)."""
from __future__ import annotations

import hmac
import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.config import PROJECT_ROOT
from pipelines.registry import REGISTRY, KnownModel, load_registry, present_models
from serving.backend import Backend, LocalBackend
from serving.engine import Engine, EngineInfo, load_engine, offered_lora

from .metrics import RunMetrics
from .outputs import OutputStore
from .session import DEFAULT_BRANCH_MEMORY_MB, SessionControl

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    backend: Backend
    info: EngineInfo  # what the backend's model offers (refreshed after a server-wide change)
    outputs: OutputStore | None = None  # None: each session writes to its own temporary folder
    admin_token: str | None = None  # lets the holder change server-wide settings from the UI/API
    max_pixel_blocks: int | None = None  # operator's cap on width x height x blocks of a fixed-length request
    weights_dir: Path | None = None
    branch_memory_mb: float = DEFAULT_BRANCH_MEMORY_MB  # branch points each visitor keeps (demo/branches.py)
    registry: dict[str, KnownModel] = field(default_factory=dict)  # known causal generators
    metrics: RunMetrics = field(default_factory=RunMetrics)
    _sessions: weakref.WeakSet = field(default_factory=weakref.WeakSet, repr=False)  # live visitors' sessions

    @property
    def config(self):
        return self.info.config

    @property
    def engine(self) -> Engine | None:
        """The model in this process (None in pool mode, where it lives on the workers)."""
        return getattr(self.backend, "engine", None)

    def new_session(self) -> SessionControl:
        """A visitor's own SessionControl (gr.State's factory); the runtime only counts who waits."""
        session = SessionControl(self.outputs, self.branch_memory_mb)
        self._sessions.add(session)
        return session

    def queue_length(self) -> int:
        """Generation requests sent and not started yet (waiting for the GPU or a worker)."""
        return sum(session.is_waiting for session in list(self._sessions))

    def check_lora(self, name: str | None, strength: float) -> str | None:
        """The LoRA file name a request may use (ValueError for a name not offered or a strength out of range)."""
        return offered_lora(name, strength, self.info.lora_names)

    def _check_admin(self, token: str | None, what: str) -> None:
        if self.backend.pooled:
            raise PermissionError(f"{what} is not offered in pool mode: every worker keeps the model and memory "
                                  "profile the pool was started with (restart it with --config / --memory-profile).")
        if self.admin_token is None or not hmac.compare_digest(str(token or ""), self.admin_token):
            raise PermissionError(f"{what} needs the operator's admin token.")

    def available_models(self) -> list[KnownModel]:
        """Registered models whose files are all in the weights folder."""
        return present_models(self.weights_dir, self.registry)

    def switch_model(self, key: str, token: str | None = None) -> str:
        """Replaces the resident model for every user (admin token only; PermissionError otherwise)."""
        self._check_admin(token, "Switching the model")
        try:
            self.engine.switch_model(key)
        finally:
            self.info = self.backend.info()
        return self.banner()

    def set_memory_profile(self, requested: str, token: str | None = None) -> str:
        """Re-plans and moves the weights for every user (admin token only; PermissionError otherwise)."""
        self._check_admin(token, "Changing the memory profile")
        summary = self.engine.set_memory_profile(requested)
        self.info = self.backend.info()
        return summary or self.banner()

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
        text = self.info.banner
        if self.backend.pooled:
            workers = self.backend.live_workers()
            text += f" · **pool:** {workers} worker{'s' if workers != 1 else ''} (one stream each)"
        return text


def load_runtime(config_path: str | Path | None, weights: str | None, device: str | None = None,
                 compile_models: bool = False, use_ema: bool | None = None, memory_profile: str = "auto",
                 vram_gb: float | None = None, prompt_extender: str | None = None,
                 outputs: OutputStore | None = None, admin_token: str | None = None,
                 kv_cache: str = "auto", registry: Path = REGISTRY, compile_cache: str | None = None,
                 attention: str = "auto", fp8: bool = False, max_pixel_blocks: int | None = None,
                 branch_memory_mb: float = DEFAULT_BRANCH_MEMORY_MB, gpus: int = 1, split: str = "auto") -> Runtime:
    """The app without a pool: the model loaded into this process, split over `gpus` GPUs when asked (a weights
    problem is kept for the UI)."""
    engine = load_engine(config_path, weights, device, compile_models, use_ema, memory_profile, vram_gb,
                         prompt_extender, kv_cache, registry, compile_cache, attention, fp8, gpus, split)
    return front_end(LocalBackend(engine), engine.weights_dir, outputs, admin_token, max_pixel_blocks, registry,
                     branch_memory_mb)


def front_end(backend: Backend, weights_dir: Path | None = None, outputs: OutputStore | None = None,
              admin_token: str | None = None, max_pixel_blocks: int | None = None, registry: Path = REGISTRY,
              branch_memory_mb: float = DEFAULT_BRANCH_MEMORY_MB) -> Runtime:
    """The front end over a backend (the model in this process, or a pool)."""
    return Runtime(backend=backend, info=backend.info(), outputs=outputs, admin_token=admin_token or None,
                   max_pixel_blocks=max_pixel_blocks, weights_dir=weights_dir, branch_memory_mb=branch_memory_mb,
                   registry=load_registry(registry),
                   metrics=RunMetrics(outputs.metrics_path if outputs else None))
