"""The process-wide, read-only model runtime: config, weights and the one pipeline core."""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.config import PipelineConfig, load_config
from pipelines.core import StreamingVideoPipeline
from pipelines.memory import MemoryPlan, configure_memory
from pipelines.pose.animation import PoseAnimator
from pipelines.pose.condition import LazyPoseEncoders
from pipelines.builder import build_pipeline, default_device, vram_bytes
from pipelines.weights import WeightsError

log = logging.getLogger(__name__)

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
    vram_bytes: int | None = None
    gpu_lock: threading.Lock = field(default_factory=threading.Lock)

    def set_memory_profile(self, requested: str) -> str:
        """Re-plans and moves the weights (waits for a running generation to finish)."""
        if self.pipeline is None:
            return self.banner()
        with self.gpu_lock:
            self.memory_plan = configure_memory(self.pipeline, requested, self.vram_bytes)
        return self.memory_plan.summary()

    @property
    def is_embedded_default(self) -> bool:
        return self.config.weights.layout == "random"

    def banner(self) -> str:
        if self.pipeline is None:
            return f"**Model not loaded:** {self.load_error}"
        text = f"**Model:** {self.pipeline.components.description} · **device:** {self.device}"
        if self.memory_plan is not None:
            text += f" · {self.memory_plan.summary()}"
        if self.is_embedded_default:
            text += (" · this is the embedded tiny model with random weights: it shows how streaming works and "
                     "makes abstract patterns. Start with `--config configs/self_forcing_dmd.yaml --weights DIR` "
                     "for real videos.")
        return text


def load_runtime(config_path: str | Path | None, weights: str | None, device: str | None = None,
                 compile_models: bool = False, use_ema: bool | None = None, memory_profile: str = "auto",
                 vram_gb: float | None = None) -> Runtime:
    """Loads once at start-up; a weights problem is kept as a message for the UI, not raised.

    Weights are read into CPU memory first; the memory plan then decides what goes to the GPU.
    """
    config = load_config(config_path, **{"weights.use_ema": use_ema})  # None: the config decides
    runtime = Runtime(config=config, device=device or default_device(), vram_bytes=vram_bytes(vram_gb))
    try:
        weights_dir = resolve_weights_source(weights)
        runtime.pipeline, runtime.memory_plan = build_pipeline(config, weights_dir, runtime.device, memory_profile,
                                                               runtime.vram_bytes, compile_models, warm=True)
    except WeightsError as err:
        log.error("%s", err)
        runtime.load_error = str(err)
        return runtime
    runtime.poser = make_pose_animator(runtime.pipeline, weights_dir)
    return runtime


def make_pose_animator(pipeline: StreamingVideoPipeline, weights_dir: Path | None) -> PoseAnimator:
    """Pose tooling with paths from the config's pose section, relative to the weights folder."""
    pose = pipeline.config.pose
    base = weights_dir or Path(".")
    encoders = LazyPoseEncoders(pipeline.generator.config.dim, base / pose["weights"] if pose.get("weights") else None,
                                pipeline.device, pipeline.dtype, pose.get("random_seed"))
    return PoseAnimator(pipeline, encoders, base / pose.get("detector_dir", "dwpose"))
