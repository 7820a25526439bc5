"""What --gpus can gain, measured on ONE GPU (no machine with several GPUs was lent): one rank's share of work.

For an N-way sequence split, the generator runs with an emulated shard: every tensor has the shape the
real rank's has (1/N of each frame's tokens outside self-attention, all tokens of 12/N heads inside it,
a KV cache of 12/N heads), and the all-to-alls are replaced by local copies of the same size, so the
timings are one rank's compute without its communication. Each configuration generates the standard
81-frame 832x480 video (random weights, bf16, compiled) and records per-block denoising and decoding.

Also times self-attention at the block shapes for the two ways of splitting it: Ulysses (each rank:
12/N heads, all 4,680 queries, all cached keys) and ring attention over a token-sharded KV cache
(each rank: 12 heads, its 4,680/N queries, N steps over K/N keys each; timed without the log-sum-exp
merge, a lower bound), with the bytes each rank sends per layer either way.

    python bench/bench_parallel_split.py --splits 1 2 3 4 --compile --out bench/results/h200_parallel_split.json
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_streaming import build_components  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.core import GenerationRequest, StreamingVideoPipeline  # noqa: E402
from pipelines.model.acceleration import accelerate  # noqa: E402
from pipelines.parallel.sequence import SequenceShard  # noqa: E402
from pipelines.settings import RuntimeSettings  # noqa: E402

QUERY_TOKENS, HEADS, HEAD_DIM = 4680, 12, 128  # one 3-frame block at 832x480
CACHED_KEYS = (4680, 14040, 23400, 32760)  # the keys a block attends to: 1, 3, 5 and 7 blocks


class EmulatedShard(SequenceShard):
    """Rank 0 of an N-way split with the all-to-alls replaced by same-sized local copies (no communication)."""

    def __init__(self, size: int) -> None:
        super().__init__(0, size, None)

    def heads_from_tokens(self, x: torch.Tensor, frames: int, frame_tokens: int) -> torch.Tensor:
        return x[:, :, :x.shape[2] // self.size].repeat(1, self.size, 1, 1)

    def tokens_from_heads(self, x: torch.Tensor, frames: int, frame_tokens: int) -> torch.Tensor:
        return x[:, :x.shape[1] // self.size].repeat(1, 1, self.size)

    def gather_tokens(self, x: torch.Tensor, frames: int, frame_tokens: int) -> torch.Tensor:
        return x.repeat(1, self.size, 1)


def cuda_ms(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


def attention_table(splits: list[int]) -> list[dict]:
    rows = []
    dtype = torch.bfloat16
    for keys in CACHED_KEYS:
        for n in splits:
            q = torch.randn(1, QUERY_TOKENS, HEADS // n, HEAD_DIM, device="cuda", dtype=dtype)
            k = torch.randn(1, keys, HEADS // n, HEAD_DIM, device="cuda", dtype=dtype)
            ulysses = cuda_ms(lambda: sdpa(q, k, k))
            q_ring = torch.randn(1, QUERY_TOKENS // n, HEADS, HEAD_DIM, device="cuda", dtype=dtype)
            k_ring = torch.randn(1, keys // n, HEADS, HEAD_DIM, device="cuda", dtype=dtype)
            ring_fused = cuda_ms(lambda: [sdpa(q_ring, k_ring, k_ring) for _ in range(n)])
            bytes_kv_moved = 2 * (keys // n) * HEADS * HEAD_DIM * 2 * (n - 1)  # ring: K/V shards passed N-1 times
            bytes_ulysses = 4 * QUERY_TOKENS * HEADS * HEAD_DIM * 2 // n * (n - 1) // n  # q, k, v, out all-to-all
            rows.append({"cached_keys": keys, "ranks": n, "ulysses_ms": round(ulysses, 3),
                         "ring_fused_steps_ms": round(ring_fused, 3),
                         "ulysses_bytes_sent_per_rank_per_layer": bytes_ulysses,
                         "ring_kv_bytes_sent_per_rank_per_layer": bytes_kv_moved})
            logging.info("%s", rows[-1])
    return rows


def time_video(pipeline: StreamingVideoPipeline, seed: int) -> dict:
    blocks, start = [], time.perf_counter()
    first, denoise, decode = None, 0.0, 0.0
    for result in pipeline.generate(GenerationRequest("a timing run", seed=seed)):
        first = first or time.perf_counter() - start
        denoise, decode = denoise + result.denoise_s, decode + result.decode_s  # (a block's first frame comes
        # on its own: its result carries the block's denoising)
        if result.complete:
            blocks.append((denoise, decode))
            denoise, decode = 0.0, 0.0
    total = time.perf_counter() - start
    return {"total_s": total, "first_frames_s": first, "denoise_ms": [round(d * 1e3, 1) for d, _ in blocks],
            "decode_ms": [round(d * 1e3, 1) for _, d in blocks]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/self_forcing_dmd.yaml")
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    config = load_config(args.config)
    device = torch.device("cuda")
    components = build_components(config, device, config.torch_dtype)
    accelerate(components, compile_models=args.compile)
    pipeline = StreamingVideoPipeline(components, config, device, RuntimeSettings(compiled=args.compile))
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": args.config,
               "compile": args.compile, "attention": attention_table(args.splits), "videos": {}}
    for n in args.splits:
        components.generator.sequence_shard = EmulatedShard(n) if n > 1 else None
        warm = time.perf_counter()
        time_video(pipeline, 0)
        runs = [time_video(pipeline, seed) for seed in range(1, args.runs + 1)]
        denoise = [sum(r["denoise_ms"]) for r in runs]
        decode = [sum(r["decode_ms"]) for r in runs]
        results["videos"][n] = {"warm_up_s": round(time.perf_counter() - warm, 1), "runs": runs,
                                "denoise_ms_per_video": statistics.median(denoise),
                                "decode_ms_per_video": statistics.median(decode),
                                "first_frames_s": statistics.median(r["first_frames_s"] for r in runs),
                                "total_s": statistics.median(r["total_s"] for r in runs)}
        logging.info("split %d: %s", n, {k: v for k, v in results["videos"][n].items() if k != "runs"})
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
