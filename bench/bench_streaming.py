"""GPU benchmark of the streaming path at full Wan2.1-T2V-1.3B size with random weights.

Speed does not depend on weight values, so the generator, the full Wan VAE and a UMT5-XXL-sized
text encoder are built with default initialisation on the GPU. Each timed run uses a new
prompt (the text encoder runs) and goes through StreamingVideoPipeline.generate(), exactly
what the app streams. Reports time to first decoded frames, per-block ms, FPS and peak memory.

    python bench/bench_streaming.py --config configs/self_forcing_dmd.yaml --runs 3 --compile
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from pathlib import Path

PROCESS_START = time.perf_counter()  # before the heavy imports: a cold start counts them

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import AutoencoderKLWan  # noqa: E402
from transformers import UMT5EncoderModel  # noqa: E402

from pipelines.builder import build_pipeline, warm_up  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.core import GenerationRequest, StreamingVideoPipeline  # noqa: E402
from pipelines.loading.text_encoder import PromptEncoder, umt5_config  # noqa: E402
from pipelines.loading.vae import WanVAE  # noqa: E402
from pipelines.loading.weights import Components, byte_tokenizer  # noqa: E402
from pipelines.memory.profiles import ATTENTION_CHOICES  # noqa: E402
from pipelines.model import compile_cache  # noqa: E402
from pipelines.model.acceleration import BLOCK_COMPILE_OPTIONS, accelerate  # noqa: E402
from pipelines.model.attention_kernels import enable_attention_kernels  # noqa: E402
from pipelines.model.fp8 import quantize_blocks_fp8  # noqa: E402
from pipelines.model.transformer import CausalWanModel  # noqa: E402
from pipelines.parallel.layout import SPLITS  # noqa: E402
from pipelines.settings import RuntimeSettings  # noqa: E402

UMT5_XXL = dict(vocab=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
PROMPTS = ["A corgi runs along a beach at sunset, waves rolling in, cinematic lighting",
           "Aerial shot of a city at night, neon lights, light rain, slow camera pan",
           "A chef slices vegetables in a busy kitchen, steam rising, close-up",
           "A red kite flying over green hills on a windy afternoon",
           "Timelapse of clouds moving over snowy mountains"]
REFERENCE = GenerationRequest("A lighthouse on a cliff in a storm, waves crashing, dramatic clouds", seed=7)


def compile_report() -> dict:
    """What the warm-up's compilation did: graphs traced, cache hits and the slowest compiler phases
    (seconds summed over all graphs), to see where a cached start still spends its time."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    phases = sorted(((name, sum(times)) for name, times in compilation_time_metrics.items()), key=lambda p: -p[1])
    wanted = ("fxgraph_cache_hit", "fxgraph_cache_miss", "autograd_cache_hit", "autograd_cache_miss",
              "coordesc_tuning_bench")
    return {"unique_graphs": counters["stats"]["unique_graphs"], "calls_captured": counters["stats"]["calls_captured"],
            **{key: counters[group][key] for group in ("inductor", "aot_autograd") for key in wanted
               if counters[group][key]},
            "slowest_phases_s": {name: round(seconds, 1) for name, seconds in phases[:10]}}


def build_components(config, device: torch.device, dtype: torch.dtype) -> Components:
    with torch.device(device):
        generator = CausalWanModel(**config.model).to(dtype)
        vae = AutoencoderKLWan(**config.vae).to(dtype)
        t5 = UMT5EncoderModel._from_config(umt5_config(**UMT5_XXL), torch_dtype=dtype)
    text_len = config.text_encoder.get("text_len", 512)
    return Components(generator.eval().requires_grad_(False), WanVAE(vae),
                      PromptEncoder(byte_tokenizer(), t5, text_len), "random full-size weights")


def split_pipeline(args: argparse.Namespace) -> StreamingVideoPipeline:
    """The app's --gpus build of the config with seeded random weights (every rank draws the same ones) and a
    random UMT5-XXL-sized text encoder on the rank that encodes prompts."""
    encoder = {f"text_encoder.{key}": value for key, value in UMT5_XXL.items() if key != "vocab"}
    config = load_config(args.config, **{"weights.layout": "random"}, **encoder)
    pipeline, _ = build_pipeline(config, None, "cuda", compile_models=args.compile, attention=args.attention,
                                 gpus=args.gpus, split=args.split)
    return pipeline


class GarbageCollectionTimer:
    """Host time the Python garbage collector spends during a run (it stalls the kernel launches)."""

    def __init__(self) -> None:
        self.ms, self.full_passes, self._start = 0.0, 0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.ms += (time.perf_counter() - self._start) * 1e3
            self.full_passes += info["generation"] == 2

    def __enter__(self) -> "GarbageCollectionTimer":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *_) -> None:
        gc.callbacks.remove(self)


def time_generation(pipeline: StreamingVideoPipeline, prompt: str, seed: int, fast_decode: bool = False) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    blocks: dict[int, dict] = {}
    frames, first = 0, None
    with GarbageCollectionTimer() as collector:
        for result in pipeline.generate(GenerationRequest(prompt, seed=seed, fast_decode=fast_decode)):
            frames += result.frames.shape[0]
            if first is None:
                first = time.perf_counter() - start
            block = blocks.setdefault(result.index, {"denoise_ms": 0.0, "decode_ms": 0.0})
            block["denoise_ms"] += result.denoise_s * 1e3
            block["decode_ms"] += result.decode_s * 1e3
    total = time.perf_counter() - start
    return {"first_frames_s": first, "total_s": total, "frames": frames, "fps": frames / total,
            "blocks": [blocks[i] for i in sorted(blocks)], "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "gc_ms": round(collector.ms, 1), "gc_full_passes": collector.full_passes}


def reference_output(pipeline: StreamingVideoPipeline, fast_decode: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    """Latents [1, C, F, h, w] and frames [T, H, W, 3] of one fixed request (REFERENCE), for comparing paths."""
    latents, frames = [], []
    request = GenerationRequest(REFERENCE.prompt, seed=REFERENCE.seed, fast_decode=fast_decode)
    for result in pipeline.generate(request):
        frames.append(result.frames)
        if result.latents is not None:
            latents.append(result.latents)
    return torch.cat(latents, dim=2), np.concatenate(frames)


def capped_runs(pipeline: StreamingVideoPipeline, card_gib: float, runs: int, compiled: bool) -> dict:
    """The same runs on an emulated card: the planner's choice for it, then the process capped."""
    from pipelines.memory.planner import GIB, configure_memory

    plan, settings = configure_memory(pipeline.components, pipeline.config, pipeline.device, "auto",
                                      int(card_gib * GIB), settings=pipeline.settings, compile_models=compiled)
    pipeline = pipeline.with_settings(settings)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(card_gib * GIB / total)
    timed = [time_generation(pipeline, PROMPTS[i % len(PROMPTS)], seed=i + 1) for i in range(runs)]
    torch.cuda.set_per_process_memory_fraction(1.0)
    return {"card_gib": card_gib, "plan": plan.summary(markdown=False),
            "fps_median": statistics.median(r["fps"] for r in timed),
            "first_frames_s_median": statistics.median(r["first_frames_s"] for r in timed),
            "peak_allocated_gib": max(r["peak_allocated_gib"] for r in timed), "runs": timed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/self_forcing_dmd.yaml")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the static-shape block parts")
    parser.add_argument("--fast-kernels", action="store_true",
                        help="pipelines.model.acceleration: cuDNN autotuning + channels-last VAE (+ --compile)")
    parser.add_argument("--sdpa", choices=["auto", "cudnn", "flash", "efficient"], default="auto",
                        help="force one scaled_dot_product_attention backend")
    parser.add_argument("--cap-gib", type=float,
                        help="after the uncapped runs, plan for a card of this size (memory planner, 'auto'), cap "
                             "the process with set_per_process_memory_fraction and time the same runs again")
    parser.add_argument("--fast-decoder", action="store_true",
                        help="decode with the TAEHV-architecture tiny decoder (random weights) instead of the Wan VAE")
    parser.add_argument("--attention", choices=ATTENTION_CHOICES, default="sdpa",
                        help="inference attention kernels as the app's --attention (auto: FlashAttention-4 per shape "
                             "where installed and faster)")
    parser.add_argument("--compile-cache", type=Path,
                        help="as the app's --compile-cache: load saved compilation results before compiling, save "
                             "them after the warm-up (time a cold start on a fresh machine)")
    parser.add_argument("--fp8", action="store_true", help="FP8 block linears, as the app's --fp8")
    parser.add_argument("--save-reference", type=Path,
                        help="after the timed runs, save one fixed request's latents and every 10th frame here "
                             "(torch.save), to compare paths run in separate processes")
    parser.add_argument("--gpus", type=int, default=1,
                        help="split each stream over this many GPUs as the app's --gpus does (built by the app's "
                             "builder: compiled with --compile, fast kernels always, seeded random weights on "
                             "every rank)")
    parser.add_argument("--split", choices=SPLITS, default="auto", help="with --gpus: as the app's --split")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)

    device = torch.device("cuda")
    config = load_config(args.config)
    build_start = time.perf_counter()
    if args.compile_cache:
        compile_cache.activate(args.compile_cache)
    torch.manual_seed(0)  # the same random weights in every process, so paths run apart compare
    if args.gpus > 1:
        pipeline = split_pipeline(args)
    else:
        components = build_components(config, device, config.torch_dtype)
        if args.fp8:
            quantize_blocks_fp8(components.generator)
        if args.fast_kernels:
            accelerate(components, compile_models=args.compile, fp8=args.fp8)
        elif args.compile:
            components.generator.compile_blocks(options=BLOCK_COMPILE_OPTIONS, dynamic=False)
        fast_decoder = None
        if args.fast_decoder:
            from pipelines.loading.tiny_decoder import TinyVideoDecoder

            fast_decoder = TinyVideoDecoder().to(device, config.torch_dtype).eval()
        settings = RuntimeSettings(fp8_linears=args.fp8, compiled=args.compile, fast_decoder=fast_decoder,
                                   attention=enable_attention_kernels(components.generator, device, args.attention))
        pipeline = StreamingVideoPipeline(components, config, device, settings)
    logging.info("built in %.1fs; resident %.1f GiB", time.perf_counter() - build_start,
                 torch.cuda.memory_allocated() / 2**30)

    if args.sdpa != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION}[args.sdpa]
        sdpa_kernel([backend]).__enter__()
    warm_start = time.perf_counter()
    warm_up(pipeline)  # the app's start-up warm-up: the timed runs show whether it reached every shape
    warm_up_s = time.perf_counter() - warm_start
    ready_s = time.perf_counter() - PROCESS_START
    logging.info("warm-up generation %.1fs; ready %.1fs after the process started", warm_up_s, ready_s)
    compilation = compile_report()
    logging.info("compilation: %s", compilation)
    if args.compile_cache:
        compile_cache.save(args.compile_cache)

    runs = [time_generation(pipeline, PROMPTS[i % len(PROMPTS)], i + 1, args.fast_decoder) for i in range(args.runs)]
    summary = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": args.config,
        "compile": args.compile, "fast_kernels": args.fast_kernels, "sdpa": args.sdpa, "attention": pipeline.settings.attention,
        "fp8": args.fp8, "gpus": args.gpus, "split": args.split if args.gpus > 1 else None,
        "compile_cache": str(args.compile_cache) if args.compile_cache else None,
        "warm_up_s": round(warm_up_s, 1), "ready_after_process_start_s": round(ready_s, 1),
        "build_start_after_process_start_s": round(build_start - PROCESS_START, 1), "compilation": compilation,
        "fast_decoder": args.fast_decoder, "dtype": config.dtype, "height": config.height, "width": config.width,
        "frames": runs[0]["frames"],
        "first_frames_s_median": statistics.median(r["first_frames_s"] for r in runs),
        "fps_median": statistics.median(r["fps"] for r in runs),
        "total_s_median": statistics.median(r["total_s"] for r in runs),
        "block_denoise_ms_median": statistics.median(b["denoise_ms"] for r in runs for b in r["blocks"]),
        "block_decode_ms_median": statistics.median(b["decode_ms"] for r in runs for b in r["blocks"]),
        "peak_allocated_gib": max(r["peak_allocated_gib"] for r in runs),
        "command": " ".join(["python"] + sys.argv),
        "runs": runs,
    }
    if args.cap_gib:
        summary["capped"] = capped_runs(pipeline, args.cap_gib, args.runs, args.compile)
    if args.save_reference:
        latents, frames = reference_output(pipeline, fast_decode=args.fast_decoder)
        torch.save({"latents": latents.to(torch.bfloat16), "frames": torch.from_numpy(frames[::10].copy())},
                   args.save_reference)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
    print(f"{summary['device']} compile={args.compile} fast={args.fast_kernels} sdpa={args.sdpa} frames={summary['frames']} "
          f"first={summary['first_frames_s_median']:.3f}s fps={summary['fps_median']:.1f} "
          f"denoise/block={summary['block_denoise_ms_median']:.0f}ms decode/block={summary['block_decode_ms_median']:.0f}ms "
          f"peak={summary['peak_allocated_gib']:.1f}GiB")
    if args.cap_gib:
        capped = summary["capped"]
        print(f"capped at {args.cap_gib:g} GiB: fps={capped['fps_median']:.1f} "
              f"({capped['fps_median'] / summary['fps_median']:.0%} of uncapped) "
              f"first={capped['first_frames_s_median']:.3f}s peak={capped['peak_allocated_gib']:.1f}GiB; "
              f"{capped['plan']}")


if __name__ == "__main__":
    main()
