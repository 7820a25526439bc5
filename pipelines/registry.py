"""The registry of known causal generators (configs/models.yaml): which are present in a weights
folder, what the others are missing, and what GPU memory each needs.

    python -m pipelines.registry --weights DIR
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from .config import REGISTRY, PipelineConfig, load_config

# UMT5-XXL (the text encoder every Wan2.1 model uses) and the Wan2.1 VAE, for memory estimates.
UMT5_XXL_PARAMS = 5_680_000_000
WAN21_VAE_PARAMS = 126_900_000


@dataclass(frozen=True)
class KnownModel:
    key: str
    config_path: Path
    code: str  # the repository whose code and configs define the checkpoint's layout and settings
    config: PipelineConfig

    @property
    def label(self) -> str:
        return self.config.name

    def files(self) -> list[str]:
        """This generator's own files, relative to the weights folder."""
        weights = self.config.weights
        return [name for name in (weights.generator_ckpt, weights.generator_lora) if name]

    def missing(self, weights_dir: Path) -> list[str]:
        """What is absent from weights_dir (the generator's files, then the shared Wan2.1 base)."""
        from .loading.weights import detected_layout

        absent = [name for name in self.files() if not (weights_dir / name).is_file()]
        if detected_layout(self.config, weights_dir) is None:
            weights = self.config.weights
            absent.append(f"{weights.original_dir}/ (or {weights.diffusers_dir}/)")
        return absent

    def download_commands(self, missing: list[str]) -> list[str]:
        """The commands that fetch what `missing` (from missing()) names: the generator's own, the Wan2.1 base."""
        from .loading.sources import WAN_BASE_DOWNLOAD

        own = [name for name in missing if name in self.files()]
        commands = [self.config.download] if own else []
        if len(own) < len(missing):  # the rest is the shared Wan2.1 base
            commands.append(WAN_BASE_DOWNLOAD)
        return commands

    def settings(self) -> str:
        """Sampler and attention settings in one line."""
        cfg, sampler = self.config, self.config.sampler
        window = "all past frames" if cfg.local_attn_size == -1 else \
            f"rolling window of {cfg.local_attn_size} latent frames ({cfg.sink_size} sink)"
        if cfg.relative_positions:
            window += ", positions within the window"
        if cfg.sink_momentum is not None:
            window += f", the sink a running average of evicted frames ({cfg.sink_momentum:g})"
        warp = "warped" if sampler.warp_denoising_step else "as given"
        first = sampler.first_block_steps
        first = f" (the first block {_steps(first)})" if first else ""
        frames = "1 latent frame per block (frame-wise)" if cfg.frames_per_block == 1 else \
            f"{cfg.frames_per_block} latent frames per block"
        rolling = f", a window of {len(sampler.denoising_steps)} blocks at staggered steps (one leaves per pass)" \
            if sampler.kind == "rolling" else ""
        return (f"{_steps(sampler.denoising_steps)} ({warp}){first}, shift "
                f"{sampler.timestep_shift:g}, {frames}{rolling}, {window}")


def _steps(steps: list[int]) -> str:
    return f"{len(steps)} step{'s' if len(steps) != 1 else ''} {steps}"


def load_registry(path: Path = REGISTRY, **overrides) -> dict[str, KnownModel]:
    """Every registered model with its config loaded (overrides as in load_config)."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    models = {}
    for key, entry in raw["models"].items():
        config_path = path.parent / entry["config"]
        models[key] = KnownModel(key, config_path, entry.get("code", ""), load_config(config_path, **overrides))
    return models


def present_models(weights_dir: Path | None, registry: dict[str, KnownModel]) -> list[KnownModel]:
    """The registered models whose files are all in weights_dir."""
    if weights_dir is None:
        return []
    return [model for model in registry.values() if not model.missing(weights_dir)]


def vram_needs(model: KnownModel) -> dict[str, float]:
    """Estimated peak GPU memory (GiB) per memory profile for the model's default video."""
    import torch
    from diffusers import AutoencoderKLWan

    from .model.transformer import CausalWanModel
    from .weights_inspector import TransformerShape, vram_by_profile

    with torch.device("meta"):
        generator = CausalWanModel(**model.config.model)
        vae_params = sum(p.numel() for p in AutoencoderKLWan(**model.config.vae).parameters()) \
            if model.config.vae else WAN21_VAE_PARAMS
    shapes = {name: tuple(p.shape) for name, p in generator.state_dict().items()}
    shape = TransformerShape.from_shapes(shapes)
    return vram_by_profile(shape, model.config, UMT5_XXL_PARAMS, vae_params)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.registry", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, help="weights folder to check (default: list the models only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.weights is not None and not args.weights.is_dir():
        print(f"{args.weights} is not a folder", file=sys.stderr)
        return 2
    for model in load_registry().values():
        needs = ", ".join(f"{name} {gib:g} GiB" for name, gib in vram_needs(model).items())
        print(f"{model.key}: {model.label}\n  code: {model.code}\n  config: configs/{model.config_path.name}"
              f"\n  files: {', '.join(model.files())}\n  sampling: {model.settings()}\n  GPU memory: {needs}")
        if args.weights is not None:
            missing = model.missing(args.weights)
            print("  present in the weights folder" if not missing else
                  "\n".join([f"  missing: {', '.join(missing)}", *(f"  get it: {command}"
                                                                   for command in model.download_commands(missing))]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
