"""Keeps torch.compile's results on disk, so a restarted server does not compile again.

Inductor's, Triton's and FlashAttention-4's own caches go under the folder (TORCHINDUCTOR_CACHE_DIR,
TRITON_CACHE_DIR, FLASH_ATTENTION_CUTE_DSL_CACHE_DIR; FX-graph and autotuning caches on). After the
warm-up, torch.compiler.save_cache_artifacts() packs what this process compiled into `artifacts.bin`;
the next start loads it with load_cache_artifacts() before anything compiles. Copying the folder is
all a fresh machine needs.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)
ARTIFACTS = "artifacts.bin"


def activate(folder: Path) -> bool:
    """Points the compiler's caches at `folder` and loads saved artifacts; returns whether any were loaded.
    Call before the first compilation in the process."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] = "1"  # read when flash_attn.cute is imported
    os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] = str(folder / "flash_attn")
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    inductor_config.autotune_local_cache = True
    path = folder / ARTIFACTS
    if not path.is_file():
        log.info("compile cache %s is empty: this start compiles and fills it", folder)
        return False
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as err:  # a cache from another torch / GPU: compile afresh, overwrite it later
        log.warning("could not load %s (%s): compiling afresh", path, err)
        return False
    log.info("compile cache loaded from %s (%s)", path, info)
    return info is not None


def save(folder: Path) -> Path | None:
    """Writes what this process compiled to folder/artifacts.bin (None when nothing was compiled)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    data, _ = saved
    path = folder / ARTIFACTS
    path.write_bytes(data)
    log.info("compile cache saved to %s (%.1f MB)", path, len(data) / 1e6)
    return path
