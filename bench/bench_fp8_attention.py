"""Is FP8 attention worth a fast-path option on this GPU? cuDNN's FP8 SDPA against bf16 SDPA and FA4.

At the streaming self-attention shapes (4680 queries of 12x128 heads over 1-7 blocks of keys, q/k/v
as the model holds them: [B, L, H, D]), times cuDNN's FP8 flash attention (nvidia-cudnn-frontend,
per-tensor e4m3 scales; its output is e4m3 too, as cuDNN allows on Hopper, scaled by 1/descale_v since
every output row is a convex combination of value rows, and dequantized to bf16 after) with and without the per-call quantization of q/k/v, and
reports its error against bf16 SDPA on random activations. GPU time from CUDA events, medians of 20.

    python bench/bench_fp8_attention.py --out bench/results/h100_fp8_attention.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.model.attention_kernels import load_flash4, sdpa  # noqa: E402
from pipelines.model.fp8 import FP8, FP8_MAX  # noqa: E402

KEYS = (4680, 14040, 23400, 32760)


def gpu_ms(fn, calls: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class CudnnFP8Attention:
    """One cuDNN FP8 SDPA graph for fixed q/k/v shapes ([B, L, H, D] tensors, bshd strides)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor) -> None:
        import cudnn

        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT, handle=self.handle)

        def bhsd(name: str, t: torch.Tensor):
            b, s, h, d = t.shape
            return graph.tensor(name=name, dim=[b, h, s, d], stride=[t.stride(0), t.stride(2), t.stride(1), t.stride(3)],
                                data_type=cudnn.data_type.FP8_E4M3)

        def scalar(name: str):
            return graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.FLOAT)

        self.q, self.k, self.v = bhsd("q", q), bhsd("k", k), bhsd("v", k)
        self.scales = [scalar(n) for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
        o, _, amax_s, amax_o = graph.sdpa_fp8(q=self.q, k=self.k, v=self.v, descale_q=self.scales[0],
                                              descale_k=self.scales[1], descale_v=self.scales[2],
                                              descale_s=self.scales[3], scale_s=self.scales[4],
                                              scale_o=self.scales[5], is_inference=True,
                                              attn_scale=1 / math.sqrt(q.shape[-1]))
        b, s, h, d = q.shape
        o.set_output(True).set_dim([b, h, s, d]).set_stride([s * h * d, d, h * d, 1]).set_data_type(
            cudnn.data_type.FP8_E4M3)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
        self.o, self.amax_s, self.amax_o = o, amax_s, amax_o
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph = graph
        self.workspace = torch.empty(graph.get_workspace_size(), device=q.device, dtype=torch.uint8)
        self.out = torch.empty(q.shape, device=q.device, dtype=FP8)
        self.amax = torch.zeros(2, device=q.device)
        p_scale = torch.tensor([FP8_MAX], device=q.device)  # softmax probabilities lie in [0, 1]
        self.fixed = (1 / p_scale, p_scale)

    def run(self, q8, k8, v8, descales) -> torch.Tensor:
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        pack = {self.q: q8, self.k: k8, self.v: v8, self.o: self.out, self.amax_s: self.amax[0:1],
                self.amax_o: self.amax[1:2]}
        for descriptor, value in zip(self.scales, (*descales, *self.fixed, 1 / descales[2])):
            pack[descriptor] = value
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return (self.out.float() * descales[2]).to(torch.bfloat16)


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3 values and their descale (x ~= values * descale)."""
    descale = (x.abs().amax().float() / FP8_MAX).clamp_min(1e-12).reshape(1)
    return (x.float() / descale).to(FP8), descale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    F.conv2d(torch.zeros(1, 1, 3, 3, device="cuda"), torch.zeros(1, 1, 1, 1, device="cuda"))  # loads libcudnn
    flash4 = load_flash4()
    rows = []
    for keys in KEYS:
        torch.manual_seed(0)
        q = torch.randn(1, 4680, 12, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, keys, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        row = {"queries": 4680, "keys": keys, "sdpa_ms": gpu_ms(lambda: sdpa(q, k, v))}
        if flash4 is not None:
            row["flash4_ms"] = gpu_ms(lambda: flash4(q, k, v))
        reference = sdpa(q, k, v).float()
        try:
            fp8 = CudnnFP8Attention(q, k)
            (q8, dq), (k8, dk), (v8, dv) = (quantize_tensor(t) for t in (q, k, v))
            row["cudnn_fp8_ms"] = gpu_ms(lambda: fp8.run(q8, k8, v8, (dq, dk, dv)))

            def quantized_call():
                (a, da), (b, db), (c, dc) = (quantize_tensor(t) for t in (q, k, v))
                return fp8.run(a, b, c, (da, db, dc))

            row["cudnn_fp8_with_quantization_ms"] = gpu_ms(quantized_call)
            out = quantized_call().float()
            row["cudnn_fp8_relative_error"] = ((out - reference).norm() / reference.norm()).item()
            row["cudnn_fp8_max_abs_error"] = (out - reference).abs().max().item()
        except Exception as err:  # report what the library said: the point is whether it runs here
            row["cudnn_fp8_error"] = f"{type(err).__name__}: {err}"[:2000]
        rows.append(row)
        print(json.dumps(row), flush=True)
    import cudnn
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cudnn_backend": torch.backends.cudnn.version(), "cudnn_frontend": cudnn.__version__,
               "command": " ".join(["python"] + sys.argv), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
