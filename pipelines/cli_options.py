"""Command-line options shared by app.py and `python -m pipelines.cli`.

Each option can also be given as an environment variable (named in its help), which is how a
Hugging Face Space is configured. This module imports nothing heavy, so `--help` is instant.
"""
from __future__ import annotations

import argparse
import os

from .config import DEFAULT_CONFIG
from .memory.profiles import ATTENTION_CHOICES, KV_CACHE_CHOICES, PROFILE_CHOICES
from .parallel.layout import SPLITS

_TRUE = {"1", "true", "yes", "on"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults (unless there is none to show) and keeps the description's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def env_flag(name: str) -> bool | None:
    """SF_X=1/0 as True/False; unset as None (the config decides)."""
    value = os.environ.get(name)
    return None if value is None or value == "" else value.strip().lower() in _TRUE


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Which model, which weights, and where it runs."""
    group = parser.add_argument_group("model (environment variables in brackets)")
    group.add_argument("--config", default=env("SF_CONFIG", str(DEFAULT_CONFIG)),
                       help="YAML in configs/, or a registered model: self_forcing_dmd, self_forcing_sid, causvid, "
                            "longlive (python -m pipelines.registry lists them); the default is the embedded tiny "
                            "model [SF_CONFIG]")
    group.add_argument("--weights", default=env("SF_WEIGHTS_DIR"),
                       help="folder with the downloaded weights, or hf://owner/repo on a Space [SF_WEIGHTS_DIR]")
    group.add_argument("--device", default=env("SF_DEVICE"), help="cuda or cpu; default: cuda when available [SF_DEVICE]")
    ema = group.add_mutually_exclusive_group()
    ema.add_argument("--use-ema", dest="use_ema", action="store_true", default=env_flag("SF_USE_EMA"),
                     help="load the checkpoint's EMA generator weights ('generator_ema'); default: the config's "
                          "weights.use_ema [SF_USE_EMA=1]")
    ema.add_argument("--no-ema", dest="use_ema", action="store_false",
                     help="load the plain 'generator' weights instead of the EMA ones [SF_USE_EMA=0]")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=bool(env_flag("SF_COMPILE")),
                       help="torch.compile the generator and VAE decoder on CUDA (compiles before serving) [SF_COMPILE]")
    group.add_argument("--compile-cache", default=env("SF_COMPILE_CACHE", "~/.cache/self-forcing/compile"),
                       metavar="DIR", help="with --compile: where compilation results are kept, so a restart "
                                           "reuses them instead of compiling again [SF_COMPILE_CACHE]")
    group.add_argument("--memory-profile", choices=PROFILE_CHOICES, default=env("SF_MEMORY_PROFILE", "auto"),
                       help="high: all weights on the GPU; medium: text encoder streamed; low: generator blocks "
                            "streamed too; auto: the most resident that fits [SF_MEMORY_PROFILE]")
    group.add_argument("--kv-cache", choices=KV_CACHE_CHOICES, default=env("SF_KV_CACHE", "auto"),
                       help="KV cache storage: bf16, fp8 (half the memory, frames differ slightly) or auto: bf16 "
                            "whenever it fits, fp8 before a rolling attention window [SF_KV_CACHE]")
    group.add_argument("--attention", choices=ATTENTION_CHOICES, default=env("SF_ATTENTION", "auto"),
                       help="attention kernels on the GPU: auto takes FlashAttention-4 (pip install flash-attn-4; "
                            "Hopper/Blackwell) for each shape where it is faster than PyTorch's SDPA, same results "
                            "up to rounding; flash4 fails if it cannot; sdpa never uses it [SF_ATTENTION]")
    group.add_argument("--fp8", action="store_true", default=bool(env_flag("SF_FP8")),
                       help="experimental: the generator blocks' linear layers in FP8 (GPUs of compute capability "
                            "8.9+, bfloat16 models); frames differ slightly from the bf16 model, and with --compile "
                            "it is not reliably faster on an H100 (README, Measured) [SF_FP8=1]")
    group.add_argument("--prompt-extender", default=env("SF_PROMPT_EXTENDER"),
                       help="folder of an instruction-tuned causal LM that extends short prompts (relative to "
                            "--weights or absolute); default: <weights>/prompt_extender or the first causal LM "
                            "folder found there [SF_PROMPT_EXTENDER]")
    group.add_argument("--vram-gb", type=float, default=_float_env("SF_VRAM_GB"),
                       help="plan for this much GPU memory (GiB) instead of the free amount [SF_VRAM_GB]")
    group.add_argument("--gpus", type=int, default=int(env("SF_GPUS", "1")),
                       help="split one stream over this many GPUs of this machine (this process is rank 0 and starts "
                            "the others; on a CPU-only machine, processes over gloo) [SF_GPUS]")
    group.add_argument("--split", choices=SPLITS, default=env("SF_SPLIT", "auto"),
                       help="with --gpus: sequence (every GPU takes a share of each generator pass), decode (2 GPUs: "
                            "one generates, one decodes and encodes prompts), both (3+: all but the last split the "
                            "passes, the last decodes); auto: decode on 2 GPUs, both on more [SF_SPLIT]")


def _float_env(name: str) -> float | None:
    value = env(name)
    return float(value) if value else None


def config_overrides(args: argparse.Namespace) -> dict:
    """The dotted config keys that command-line options override (None leaves the config's value)."""
    return {"weights.use_ema": args.use_ema}
