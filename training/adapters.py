"""What the trainer trains and saves: peft LoRA layers in the project's CausalWanModel, all weights
(--full), and the pose encoders; files in the forms the app and the CLI load."""
from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file
from torch import nn

from pipelines.loading.lora import FORMAT_TAG

from .config import DEFAULT_TARGETS


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             targets: list[str] | None = None) -> list[nn.Parameter]:
    """Injects LoRA layers (peft) into `model` in place, freezes everything else, returns the LoRA
    parameters (float32). The model stays a CausalWanModel, so the streaming pipeline runs it as is."""
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets or DEFAULT_TARGETS,
                        init_lora_weights=True)
    inject_adapter_in_model(config, model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for param in params:
        param.data = param.data.float()
        param.requires_grad_(True)
    return params


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """diffusers/peft-named LoRA weights ('blocks.0.attn1.to_q.lora_A.weight')."""
    return {k.replace(".default", ""): v.detach().float().cpu().contiguous()
            for k, v in get_peft_model_state_dict(model).items()}


def save_lora(model: nn.Module, path: Path, rank: int, alpha: float, base: str,
              provenance: dict[str, str] | None = None) -> Path:
    """The project's adapter file: 'transformer.'-prefixed peft names + rank/alpha in the metadata, and what it
    was trained for (base config, stages, steps, clips, captions: pipelines.loading.lora.provenance reads them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"transformer.{k}": v for k, v in lora_state(model).items()}
    metadata = {**(provenance or {}), "format": FORMAT_TAG, "rank": str(rank), "alpha": str(alpha), "base": base}
    save_file(state, str(path), metadata=metadata)
    return path


def save_module(module: nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}, str(path))
    return path

