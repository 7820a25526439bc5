"""Typed training configuration: the YAML files the trainer and the fine-tuning command read.

The dataclasses hold the defaults (configs/train_lora.yaml repeats them with comments); a YAML file is
merged over them through omegaconf's structured configs, so a misspelt or unknown key fails at load
with the key's name instead of being ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

DEFAULT_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                   "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]


class TrainingConfigError(ValueError):
    """A training YAML that cannot be used: the message names the file and the key."""


@dataclass
class LoraSettings:
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


@dataclass
class ObjectiveSettings:
    """training/objective.py's FlowObjective, as configured."""
    shift: float = 5.0
    sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    teacher_forcing: float = 0.0
    few_step_fraction: float = 0.0
    foreground_weight: float = 0.0


@dataclass
class PoseSettings:
    init: Optional[str] = None  # a pose-encoder file to start from


@dataclass
class ValidationSettings:
    prompts: list[str] = field(default_factory=lambda: [
        "A person claps their hands in a bright living room, medium shot"])
    blocks: int = 3
    seed: int = 42


@dataclass
class DistillSettings:
    """How a teacher's paths are recorded (training/distill.py)."""
    teacher_steps: int = 24  # Euler steps per block; the student's sigmas must lie on that grid
    guidance: float = 2.0  # classifier-free guidance against the empty prompt
    image_to_video: float = 0.4  # share of clips whose first latent is given


@dataclass
class TrainingConfig:
    model_config: str = "configs/self_forcing_dmd.yaml"
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 1
    gradient_accumulation: int = 1
    data_in_memory: bool = False
    image_to_video: float = 0.0
    prompt_dropout: float = 0.0
    loss: str = "flow"  # flow | ode_regression
    learning_rate: float = 1.0e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 50
    lr_schedule: str = "cosine"  # cosine | constant
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto | bf16 | fp16 | no
    gradient_checkpointing: bool = True
    checkpointed_blocks: Optional[int] = 24
    lora: LoraSettings = field(default_factory=LoraSettings)
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    pose: PoseSettings = field(default_factory=PoseSettings)
    checkpoint_every: int = 200
    validate_every: int = 200
    log_every: int = 10
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)

    def __post_init__(self) -> None:
        if self.loss not in ("flow", "ode_regression"):
            raise TrainingConfigError(f"loss must be 'flow' or 'ode_regression', got {self.loss!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise TrainingConfigError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")


@dataclass
class PathSettings:
    """How the adapted teacher's paths are recorded for the student (training/finetune.py)."""
    per_clip: int = 2  # teacher videos (noise seeds) per prepared clip
    steps: Optional[int] = None  # Euler steps per block (default: the teacher config's num_steps)
    guidance: Optional[float] = None  # classifier-free guidance (default: the teacher config's)
    image_to_video: float = 0.25  # share of clip videos whose first latent is the clip's own
    batch_size: int = 64  # videos sampled together
    on_policy: bool = False  # true: targets at the inputs the student's own sampler reaches
    # (distill.on_policy_paths); false: the teacher's paths from pure noise (distill.teacher_trajectories, as the
    # from-scratch recipe does). Both measured on the tiny model in bench/results/NOTES.md.


@dataclass
class PreserveSettings:
    """Prior preservation: the adapted teacher's videos of prompts the model already knew, so the student's
    LoRA learns to leave them as they were."""
    prompts: list[str] = field(default_factory=list)
    per_prompt: int = 1  # videos (noise seeds) per prompt
    resolution: Optional[str] = None  # "WIDTHxHEIGHT" (default: the model config's)


@dataclass
class FinetuneConfig:
    """configs/tiny_lora.yaml, configs/finetune_lora.yaml: one command's stages. The training keys at the top
    (see TrainingConfig) apply to every stage; `teacher:` and `student:` override them per stage."""
    model_config: str = "configs/self_forcing_dmd.yaml"
    teacher_config: Optional[str] = None  # default: the model config's `teacher`
    transfer: str = "ode_regression"  # distilled models: ode_regression, or flow (plain flow matching on the
    # student: what damages it, kept to show why)
    training: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] = field(default_factory=dict)
    student: dict[str, Any] = field(default_factory=dict)
    paths: PathSettings = field(default_factory=PathSettings)
    preserve: PreserveSettings = field(default_factory=PreserveSettings)

    def __post_init__(self) -> None:
        if self.transfer not in ("ode_regression", "flow"):
            raise TrainingConfigError(f"transfer must be 'ode_regression' or 'flow', got {self.transfer!r}")


def _structured(schema: type, path: str | Path | None, data: Any, overrides: dict[str, Any]) -> Any:
    merged = OmegaConf.structured(schema)
    try:
        if path is not None:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        if data is not None:
            merged = OmegaConf.merge(merged, data)
        for key, value in overrides.items():
            if value is not None:
                OmegaConf.update(merged, key, value, merge=True)
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, TrainingConfigError) as err:
        where = f"{path}: " if path is not None else ""
        message = str(err).splitlines()[0]
        raise TrainingConfigError(f"{where}{message}") from err


FINETUNE_ONLY = ("teacher_config", "transfer", "teacher", "student", "paths", "preserve")


def load_training_config(path: str | Path | None = None, data: dict | None = None,
                         **overrides: Any) -> TrainingConfig:
    """A training YAML (and/or a dict) over the defaults; dotted keyword overrides, None ignored. A fine-tuning
    YAML (configs/tiny_lora.yaml) gives its single-stage settings: its training keys and its `student:` ones."""
    from pipelines.config import resolve_config_path

    path = resolve_config_path(path) if path is not None else None  # (configs/... from any working directory)
    if path is not None and any(key in OmegaConf.load(path) for key in FINETUNE_ONLY):
        finetune = load_finetune_config(path)
        data = {**finetune.training, **finetune.student, "model_config": finetune.model_config, **(data or {})}
        path = None
    return _structured(TrainingConfig, path, data, overrides)


def load_finetune_config(path: str | Path) -> FinetuneConfig:
    """A fine-tuning YAML: its training keys stay a dict until each stage merges them (checked here, so a
    wrong key fails before any stage runs)."""
    from pipelines.config import resolve_config_path

    path = resolve_config_path(path)
    if not path.is_file():
        raise TrainingConfigError(f"{path} does not exist: give a fine-tuning YAML such as configs/tiny_lora.yaml")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    own = {key: raw.pop(key) for key in list(raw) if key in FinetuneConfig.__dataclass_fields__}
    try:
        config = _structured(FinetuneConfig, None, own, {})
        for stage in ("teacher", "student"):
            load_training_config(None, {**raw, **getattr(config, stage)})
    except TrainingConfigError as err:
        raise TrainingConfigError(f"{path}: {err}") from err
    config.training = raw
    return config
