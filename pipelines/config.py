"""Typed view of the omegaconf YAML files in configs/."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

if TYPE_CHECKING:  # torch stays out of the import path of command-line parsing
    import torch

    from .model.kv_cache import AttentionWindow

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"
REGISTRY = CONFIG_DIR / "models.yaml"  # the known causal generators (pipelines.registry reads it)


def display_path(path: str | Path) -> str:
    """A folder or file as a page may show it: relative to the project, else its last two parts (a hosted demo
    must not show the server's layout)."""
    path = Path(path).expanduser().resolve()
    if path == PROJECT_ROOT or PROJECT_ROOT in path.parents:
        return str(path.relative_to(PROJECT_ROOT)) or "."
    return str(Path("…", *path.parts[-2:])) if len(path.parts) > 2 else str(path)


@dataclass
class SamplerConfig:
    kind: str = "few_step"  # "few_step" (distilled, Self-Forcing), "multi_step" (CFG + solver) or "rolling"
    # (Rolling Forcing: a window of len(denoising_steps) blocks at staggered steps, one block finished per pass)
    denoising_steps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    first_block_steps: list[int] | None = None  # the first generated block's own list (Causal Forcing++'s 1- and
    # 2-step frame-wise models take 4 steps there); None: the same list as every block
    warp_denoising_step: bool = True
    timestep_shift: float = 5.0
    context_noise: int = 0
    solver: str = "unipc"
    num_steps: int = 50
    guidance_scale: float = 3.0


@dataclass
class WeightsConfig:
    layout: str = "auto"  # auto | original | diffusers | random
    original_dir: str = "wan_models/Wan2.1-T2V-1.3B"
    diffusers_dir: str = "Wan2.1-T2V-1.3B-Diffusers"
    generator_ckpt: str | None = "checkpoints/self_forcing_dmd.pt"
    use_ema: bool = False
    generator_lora: str | None = None  # merged into the generator once at load (LongLive's lora.pt)
    generator_lora_scale: float = 1.0
    random_seed: int = 0
    bundled_dir: str | None = None  # the model's own files inside this repository (diffusers layout),
    # read when the weights folder does not hold them (configs/tiny.yaml)


@dataclass
class DemoConfig:
    """What the UI says and offers for this model (demo/ui.py)."""
    note: str = ""  # appended to the banner: what this model is and what to try
    pose_note: str = ""  # appended to the pose tab's help
    prompts: list[str] = field(default_factory=list)  # text-to-video examples (empty: the UI's own)
    examples_dir: str = "assets/examples"  # STEM.png: image-to-video examples, the stem their prompt;
    # pose/STEM.png + pose/STEM.mp4: a reference image and its rendered pose video
    blocks: int | None = None  # the Blocks slider's start value (default: the config's num_blocks)
    switch_note: str = ""  # appended to the prompt switch's help: how a switch shows with this model


@dataclass
class PipelineConfig:
    name: str
    model: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    sampler: SamplerConfig
    weights: WeightsConfig
    frames_per_block: int = 3
    local_attn_size: int = -1
    sink_size: int = 0
    relative_positions: bool = False  # keys placed by their slot in the rolling window, not their frame (Reward Forcing)
    sink_momentum: float | None = None  # the sink as a running average of evicted frames (Reward Forcing: 0.999)
    height: int = 480
    width: int = 832
    num_blocks: int = 7
    max_blocks: int = 20
    max_side: int = 1280  # the largest height or width a request may ask for
    continuous_minutes: float = 10.0  # continuous mode stops after this much video
    continuous_window: list[int] = field(default_factory=lambda: [21, 3])  # [window, sink] latent frames when
    # the config itself attends to every frame (a continuous run needs a rolling window)
    fps: int = 16
    dtype: str = "bfloat16"
    negative_prompt: str = ""
    resolutions: list[str] = field(default_factory=list)  # "WIDTHxHEIGHT" choices offered in the UI
    pose: dict[str, Any] = field(default_factory=dict)  # weights / detector_dir (relative to weights) / random_seed
    download: str = ""  # how to get this generator's own files into the weights folder
    teacher: str = ""  # the multi-step model config this few-step generator was distilled from (what
    # fine-tuning adapts first, training/finetune.py); empty: unknown or not distilled
    demo: DemoConfig = field(default_factory=DemoConfig)
    source: str = ""

    def __post_init__(self) -> None:
        if self.sampler.kind == "rolling":  # the anchor is the first block; a pass sees anchor + window (+ recent)
            window = len(self.sampler.denoising_steps) * self.frames_per_block
            if self.sink_size != self.frames_per_block or self.local_attn_size < window + self.sink_size:
                raise ValueError(f"{self.name}: a rolling sampler needs sink_size = frames_per_block (the anchor) and "
                                 f"local_attn_size >= {window + self.frames_per_block} (anchor + window)")

    @property
    def resolution_choices(self) -> list[str]:
        return self.resolutions or [f"{self.width}x{self.height}"]

    @property
    def attention_window(self) -> "AttentionWindow":
        from .model.kv_cache import AttentionWindow
        return AttentionWindow.from_config(self.local_attn_size, self.sink_size, self.relative_positions,
                                           self.sink_momentum)

    @property
    def continuous_blocks(self) -> int:
        """Blocks in continuous_minutes of video (4 video frames per latent frame)."""
        return max(1, int(self.continuous_minutes * 60 * self.fps) // self.video_frames_per_block)

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch
        return getattr(torch, self.dtype)

    @property
    def uses_cfg(self) -> bool:
        return self.sampler.kind == "multi_step"

    @property
    def text_to_video_only(self) -> bool:
        """A rolling-window sampler denoises several blocks at once: no image or pose first frame, no branch of a run
        (its blocks in flight are not kept)."""
        return self.sampler.kind == "rolling"

    @property
    def is_distilled(self) -> bool:
        """A few-step sampler means a distilled generator: fine-tuning it by flow matching alone damages it."""
        return self.sampler.kind == "few_step"

    @property
    def vae_scale_factor_spatial(self) -> int:
        """Pixels per latent pixel, from the VAE config (diffusers' AutoencoderKLWan `scale_factor_spatial`)."""
        return int(self.vae.get("scale_factor_spatial", 8))

    @property
    def vae_scale_factor_temporal(self) -> int:
        """Video frames per latent frame after the first (AutoencoderKLWan `scale_factor_temporal`)."""
        return int(self.vae.get("scale_factor_temporal", 4))

    @property
    def size_multiple(self) -> int:
        """Heights and widths are multiples of this: a latent pixel per VAE stride, a token per patch."""
        return self.vae_scale_factor_spatial * int(self.model.get("patch_size", (1, 2, 2))[1])

    @property
    def video_frames_per_block(self) -> int:
        return self.vae_scale_factor_temporal * self.frames_per_block

    def block_video_frames(self, index: int) -> int:
        """Video frames block `index` covers: a run's first latent frame is one video frame, every later one
        vae_scale_factor_temporal."""
        return self.video_frames_per_block - (self.vae_scale_factor_temporal - 1 if index == 0 else 0)

    def input_blocks(self, video_frames: int) -> int:
        """Whole blocks a video of `video_frames` frames fills (video-to-video)."""
        first = self.block_video_frames(0)
        return 0 if video_frames < first else 1 + (video_frames - first) // self.block_video_frames(1)

    def latent_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        stride = self.vae_scale_factor_spatial
        return (height or self.height) // stride, (width or self.width) // stride


def parse_resolution(text: str) -> tuple[int, int]:
    """'832x480' (width x height) -> (height, width); ValueError with a readable message otherwise."""
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"Resolution must look like 832x480 (width x height), got {text!r}.")
    width, height = (int(p) for p in parts)
    return height, width


def _load_with_base(path: Path) -> Any:
    """A YAML file merged over the file its `base:` key names (relative to it), recursively: the
    causal checkpoints share Wan2.1-1.3B's architecture and change only their own settings."""
    raw = OmegaConf.load(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    return OmegaConf.merge(_load_with_base(path.parent / base), raw)


def resolve_config_path(name: str | Path | None) -> Path:
    """A config file, or the name of a model in configs/models.yaml (e.g. "longlive")."""
    if not name:
        return DEFAULT_CONFIG
    path = Path(name)
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        return PROJECT_ROOT / path  # a repository path such as configs/tiny.yaml, from any working directory
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        registered = OmegaConf.load(REGISTRY).models
        if str(name) in registered:
            return CONFIG_DIR / registered[str(name)].config
        raise ValueError(f"Unknown model or config {name!r}: give a YAML file or one of {', '.join(registered)}.")
    return path


def load_config(path: str | Path | None = None, **overrides: Any) -> PipelineConfig:
    """Loads a YAML config (or a registered model's, by name); keyword overrides use dotted keys,
    e.g. {"weights.use_ema": True}."""
    path = resolve_config_path(path)
    raw = _load_with_base(path)
    for key, value in overrides.items():
        if value is not None:
            OmegaConf.update(raw, key, value)
    data = OmegaConf.to_container(raw, resolve=True)
    return PipelineConfig(
        name=data.pop("name", path.stem),
        model=data.pop("model"),
        vae=data.pop("vae", {}),
        text_encoder=data.pop("text_encoder", {}),
        sampler=SamplerConfig(**data.pop("sampler", {})),
        weights=WeightsConfig(**data.pop("weights", {})),
        demo=DemoConfig(**data.pop("demo", {})),
        source=str(path),
        **data,
    )
