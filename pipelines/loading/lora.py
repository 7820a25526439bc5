"""LoRA adapters for the causal generator: reading the published formats and merging into the weights.

Accepted files (.safetensors, or a peft adapter folder):
  - this project's own adapters (training/), diffusers / peft names
    (`transformer.blocks.N.attn1.to_q.lora_A.weight`, optional `base_model.model.` prefix);
  - original Wan / ComfyUI names (`diffusion_model.blocks.N.self_attn.q.lora_down.weight` + `.alpha`),
    LongLive's peft adapter of the original Wan model (`lora.pt`: `generator_lora` ->
    `base_model.model.blocks.N.self_attn.q.lora_A.weight`, alpha = rank),
    and musubi-tuner names (`lora_unet_blocks_N_self_attn_q.lora_down.weight`), converted with
    diffusers' own Wan LoRA converters.

Adapters are merged into the generator's weights (W += scale * B @ A, computed in float32) just
before a generation and the original weights are restored exactly before another choice is
merged. The weight tensors are updated in place, so compiled blocks keep their graphs and
streamed (low-VRAM) blocks, whose CPU masters are the parameters between runs, get them too.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

FORMAT_TAG = "self-forcing-streaming-lora"


class LoraError(ValueError):
    """A LoRA file that cannot be used with this generator; the message names the file and keys."""


@dataclass(frozen=True)
class LoraChoice:
    path: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraChoice":
        """'PATH' or 'PATH:SCALE' (the command-line form)."""
        path, separator, scale = text.rpartition(":")
        try:
            return cls(path, float(scale)) if separator else cls(text)
        except ValueError:
            return cls(text)


@dataclass
class LoraDelta:
    down: torch.Tensor  # A [rank, in_features]
    up: torch.Tensor  # B [out_features, rank]
    scale: float  # alpha / rank (1.0 when the file bakes it into the weights)


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if path.is_dir():  # a peft adapter folder
        config = json.loads((path / "adapter_config.json").read_text()) if (path / "adapter_config.json").is_file() else {}
        state, _ = _read_file(path / "adapter_model.safetensors")
        return state, {"alpha": str(config.get("lora_alpha", "")), "rank": str(config.get("r", ""))}
    if path.suffix != ".safetensors":
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("generator_lora", state), {}  # LongLive's lora.pt nests it
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


def provenance(path: str | Path) -> str:
    """What a LoRA file says it was trained for, in one line, from the metadata training/ writes (base_config,
    stages, steps, clips, captions); "" when it says nothing: another tool's file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            metadata = dict(handle.metadata() or {})
    except Exception:  # unreadable or not safetensors: the loader names the problem when it is used
        return ""
    if not metadata.get("base_config"):
        return ""
    parts = [f"for {metadata['base_config']}"]
    if metadata.get("stages"):
        parts.append(metadata["stages"])
    elif metadata.get("steps"):
        parts.append(f"{metadata['steps']} steps")
    if metadata.get("clips"):
        parts.append(f"{metadata['clips']} clips, {metadata.get('captions', '?')} captions")
    return "; ".join(parts)


def normalize_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """-> (diffusers-named state without prefixes, whether alpha is already baked into the weights)."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_musubi_wan_lora_to_diffusers,
        _convert_non_diffusers_wan_lora_to_diffusers,
    )

    baked = False
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}  # peft-wrapped models
    if any(k.startswith("lora_unet_") for k in state):
        state, baked = _convert_musubi_wan_lora_to_diffusers(dict(state)), True
    elif any(k.startswith("diffusion_model.") for k in state) or any(
            ".self_attn." in k or ".cross_attn." in k for k in state):
        state = {k if k.startswith("diffusion_model.") else "diffusion_model." + k: v for k, v in state.items()}
        state, baked = _convert_non_diffusers_wan_lora_to_diffusers(state), True
    out = {}
    for key, value in state.items():
        for prefix in ("base_model.model.", "transformer."):
            key = key.removeprefix(prefix)
        out[key.replace(".default.", ".")] = value
    return out, baked


def read_lora(path: str | Path, model: nn.Module) -> dict[str, LoraDelta]:
    """Module name -> LoraDelta, checked against `model`'s Linear layers (LoraError otherwise)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise LoraError(f"LoRA file {path} does not exist.")
    try:
        raw, metadata = _read_file(path)
        state, baked = normalize_keys(raw)
    except LoraError:
        raise
    except Exception as err:  # unreadable, truncated or not a LoRA at all
        raise LoraError(f"Could not read {path} as a LoRA ({type(err).__name__}: {str(err).splitlines()[0][:160]}).") from err
    modules = dict(model.named_modules())
    downs = {k[: -len(".lora_A.weight")]: v for k, v in state.items() if k.endswith(".lora_A.weight")}
    ups = {k[: -len(".lora_B.weight")]: v for k, v in state.items() if k.endswith(".lora_B.weight")}
    unknown = sorted(k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    unknown += sorted(f"{name} (no Linear layer of that name)" for name in downs
                      if not isinstance(modules.get(name), nn.Linear))
    unknown += sorted(f"{name}.lora_B.weight (no lora_A)" for name in set(ups) - set(downs))
    if unknown or not downs:
        first = ", ".join(unknown[:3]) or "no lora_A/lora_B (or lora_down/lora_up) weights"
        raise LoraError(f"{path} is not a LoRA for this Wan generator: {len(unknown)} unknown keys (first: {first}).")
    mismatched = []
    for name, down in downs.items():
        linear, up = modules[name], ups.get(name)
        if up is None or down.shape[1] != linear.in_features or up.shape[0] != linear.out_features \
                or up.shape[1] != down.shape[0]:
            mismatched.append(f"{name}: A {tuple(down.shape)}, B {tuple(up.shape) if up is not None else None} vs "
                              f"layer {linear.out_features}x{linear.in_features}")
    if mismatched:
        raise LoraError(f"{path} was made for another base model: {len(mismatched)} layers do not fit this generator "
                        f"(first: {'; '.join(mismatched[:2])}).")
    alpha, rank = metadata.get("alpha", ""), metadata.get("rank", "")
    scale = 1.0 if baked or not alpha else float(alpha) / float(rank or next(iter(downs.values())).shape[0])
    return {name: LoraDelta(down.float(), ups[name].float(), scale) for name, down in downs.items()}


@torch.no_grad()
def add_to_weights(modules: dict[str, nn.Module], layers: dict[str, LoraDelta], strength: float) -> None:
    """W += strength * scale * B @ A, computed in float32, in place."""
    for name, delta in layers.items():
        weight = modules[name].weight
        update = (delta.up @ delta.down) * (delta.scale * strength)
        weight.copy_((weight.float() + update.to(weight.device)).to(weight.dtype))


def merge_permanently(model: nn.Module, path: str | Path, strength: float = 1.0) -> int:
    """Bakes a LoRA that is part of a published model (LongLive's lora.pt) into its weights; returns
    the number of layers changed. Raises LoraError naming the file when it does not fit."""
    layers = read_lora(path, model)
    add_to_weights(dict(model.named_modules()), layers, strength)
    return len(layers)


class LoraMerger:
    """Keeps the generator's weights equal to base + the active LoRAs (one choice at a time)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.active: tuple[LoraChoice, ...] = ()
        self._originals: dict[str, torch.Tensor] = {}  # CPU copies of every weight a LoRA has touched
        self._cache: dict[str, dict[str, LoraDelta]] = {}
        self._lock = threading.Lock()

    def load(self, path: str) -> dict[str, LoraDelta]:
        """Reads (once) and checks a LoRA file; raises LoraError."""
        if path not in self._cache:
            self._cache[path] = read_lora(path, self.model)
            log.info("LoRA %s: %d layers", path, len(self._cache[path]))
        return self._cache[path]

    @torch.no_grad()
    def activate(self, choices: tuple[LoraChoice, ...]) -> None:
        """Makes the weights base + choices; files are checked before any weight changes."""
        choices = tuple(c for c in choices if c.scale != 0)
        with self._lock:
            if choices == self.active:
                return
            deltas = [(self.load(c.path), c.scale) for c in choices]
            modules = dict(self.model.named_modules())
            self._weights_changing(choices)
            self._restore(modules)
            for layers, strength in deltas:
                for name in layers:
                    if name not in self._originals:
                        self._originals[name] = modules[name].weight.detach().to("cpu", copy=True)
                add_to_weights(modules, layers, strength)
            self.active = choices

    def _weights_changing(self, choices: tuple[LoraChoice, ...]) -> None:
        """Called once the files of `choices` were read and checked, before the weights change to them."""
        streamer = getattr(self.model, "weight_streamer", None)
        if streamer is not None:
            streamer.invalidate()

    def _restore(self, modules: dict[str, nn.Module]) -> None:
        for name, original in self._originals.items():
            modules[name].weight.copy_(original)
        self.active = ()
