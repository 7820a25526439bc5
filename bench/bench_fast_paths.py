"""GPU benchmark of the exact and fast paths at full Wan2.1-T2V-1.3B size, random weights, one process.

Paths, in this order (FP8 conversion cannot be undone): the exact bf16 path with FlashAttention-4 per
shape (the app's default `--attention auto`); the same with SDPA only; FA4 with the TAEHV decoder; FP8
block linears (`--fp8`); FP8 with the TAEHV decoder. Each path is warmed up as the app does (compiles),
then timed over --runs generations. One fixed prompt and seed per path gives its latents and decoded
frames, compared with the exact SDPA path's: relative latent error and PSNR of the frames (the TAEHV
decoder has random weights here, so only its speed means anything). Also times FA4 against SDPA at the
block shapes. Needs flash-attn-4 installed.

    python bench/bench_fast_paths.py --runs 3 --out bench/results/h100_fast_paths.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_streaming import PROMPTS, build_components, reference_output, time_generation  # noqa: E402
from compare_references import latent_relative_error, psnr  # noqa: E402

from pipelines.builder import warm_up  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.core import StreamingVideoPipeline  # noqa: E402
from pipelines.loading.tiny_decoder import TinyVideoDecoder  # noqa: E402
from pipelines.model import compile_cache  # noqa: E402
from pipelines.model.acceleration import FP8_BLOCK_COMPILE_OPTIONS, accelerate  # noqa: E402
from pipelines.model.attention_kernels import enable_attention_kernels, load_flash4, sdpa, time_kernel  # noqa: E402
from pipelines.model.fp8 import quantize_blocks_fp8  # noqa: E402
from pipelines.settings import RuntimeSettings  # noqa: E402

log = logging.getLogger("bench_fast_paths")
BLOCK_KEYS = (4680, 14040, 23400, 32760)  # 1, 3, 5, 7 blocks of 3 latent frames at 832x480


def kernel_table(heads: int, head_dim: int) -> list[dict]:
    """FA4 against SDPA at the streaming self-attention shapes (4680 queries): GPU time plus launch
    time per call, as the per-shape choice weighs them."""
    flash4 = load_flash4()
    rows = []
    for keys in BLOCK_KEYS:
        q = torch.randn(1, 4680, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, keys, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        reference = sdpa(q, k, v)
        rows.append({"queries": 4680, "keys": keys, "sdpa_ms": round(time_kernel(sdpa, q, k, v), 4),
                     "flash4_ms": round(time_kernel(flash4, q, k, v), 4),
                     "max_abs_diff": float((flash4(q, k, v).float() - reference.float()).abs().max())})
    return rows


def run_path(pipeline: StreamingVideoPipeline, name: str, fast_decode: bool,
             runs: int) -> tuple[dict, tuple[torch.Tensor, np.ndarray]]:
    """Warm-up as the app does, timed runs, then the reference request's latents and frames."""
    start = time.perf_counter()
    warm_up(pipeline)
    warm_s = time.perf_counter() - start
    timed = [time_generation(pipeline, PROMPTS[i % len(PROMPTS)], i + 1, fast_decode) for i in range(runs)]
    result = {
        "path": name, "attention": pipeline.settings.attention, "fp8": pipeline.settings.fp8_linears, "fast_decoder": fast_decode,
        "warm_up_s": round(warm_s, 1),
        "fps_median": statistics.median(r["fps"] for r in timed),
        "first_frames_s_median": statistics.median(r["first_frames_s"] for r in timed),
        "block_denoise_ms_median": statistics.median(b["denoise_ms"] for r in timed for b in r["blocks"]),
        "block_decode_ms_median": statistics.median(b["decode_ms"] for r in timed for b in r["blocks"]),
        "peak_allocated_gib": max(r["peak_allocated_gib"] for r in timed),
        "runs": timed,
    }
    log.info("%s: %.1f FPS, first %.3f s, denoise %.0f ms, decode %.0f ms, warm-up %.0f s", name,
             result["fps_median"], result["first_frames_s_median"], result["block_denoise_ms_median"],
             result["block_decode_ms_median"], warm_s)
    return result, reference_output(pipeline, fast_decode)


def compare_with(result: dict, output: tuple[torch.Tensor, np.ndarray], exact: tuple[torch.Tensor, np.ndarray]) -> None:
    latents, frames = output
    result["latent_relative_error"] = latent_relative_error(latents, exact[0])
    result["frames_psnr_db"] = None if result["fast_decoder"] else psnr(frames, exact[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/self_forcing_dmd.yaml")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True, help="results JSON, rewritten after each path")
    parser.add_argument("--compile-cache", type=Path,
                        help="save the first path's compilation results here (the app's default start, for a "
                             "cold-start run of bench_streaming.py --compile-cache on a fresh machine)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    if args.compile_cache:
        compile_cache.activate(args.compile_cache)
    torch._dynamo.config.cache_size_limit = 512  # every path's graphs stay compiled side by side
    torch._dynamo.config.accumulated_cache_size_limit = 4096

    config = load_config(args.config)
    device = torch.device("cuda")
    components = build_components(config, device, config.torch_dtype)
    generator = components.generator
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": args.config,
               "height": config.height, "width": config.width, "dtype": config.dtype, "compile": True,
               "command": " ".join(["python"] + sys.argv),
               "attention_kernels": kernel_table(generator.config.num_heads, generator.head_dim), "paths": []}
    compiled = accelerate(components, compile_models=True)
    settings = RuntimeSettings(compiled=compiled, fast_decoder=TinyVideoDecoder().to(device, config.torch_dtype).eval())
    outputs = []

    def run(name: str, fast_decode: bool) -> None:
        result, output = run_path(pipeline, name, fast_decode, args.runs)
        summary["paths"].append(result)
        outputs.append(output)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))

    pipeline = StreamingVideoPipeline(components, config, device, dataclasses.replace(
        settings, attention=enable_attention_kernels(generator, device, "flash4")))
    run("exact bf16, FA4/SDPA per shape (app default)", False)
    if args.compile_cache:
        compile_cache.save(args.compile_cache)
    generator.set_attention_kernel(None)
    pipeline = pipeline.with_settings(dataclasses.replace(settings, attention="sdpa"))
    run("exact bf16, SDPA only", False)
    pipeline = pipeline.with_settings(dataclasses.replace(settings, attention=enable_attention_kernels(
        generator, device, "flash4")))
    run("exact bf16, FA4/SDPA + TAEHV decoder", True)
    quantize_blocks_fp8(generator)
    generator.compile_blocks(options=FP8_BLOCK_COMPILE_OPTIONS, dynamic=False)  # as accelerate(fp8=True) does
    pipeline = pipeline.with_settings(dataclasses.replace(pipeline.settings, fp8_linears=True))
    run("FP8 linears, FA4/SDPA", False)
    run("FP8 linears, FA4/SDPA + TAEHV decoder", True)
    for result, output in zip(summary["paths"], outputs):
        compare_with(result, output, outputs[1])  # against the exact SDPA path
    args.out.write_text(json.dumps(summary, indent=2))
    for path in summary["paths"]:
        print(f"{path['path']:45s} {path['fps_median']:5.1f} FPS  first {path['first_frames_s_median']:.3f} s  "
              f"denoise {path['block_denoise_ms_median']:.0f} ms  decode {path['block_decode_ms_median']:.0f} ms  "
              f"latent err {path['latent_relative_error']:.2e}  PSNR {path['frames_psnr_db']}")


if __name__ == "__main__":
    main()
