"""The opt-in FP8 path, the fast decoder's label and the attention option: clear refusals where they
cannot run, planning that keeps FP8 weights resident, approximate paths named wherever frames come out,
and the FP8 layer's arithmetic and compilation (torch._scaled_mm also runs on the CPU; the app still
refuses FP8 there, where it would only be slower).

On a GPU: tests/test_gpu_kernels.py; speed in bench/results/h100_fast_paths*.json.
"""
from __future__ import annotations

import os

import pytest
import torch
from test_memory import REAL
from torch import nn
from torch._dynamo.utils import counters

from pipelines.builder import build_pipeline
from pipelines.core import GenerationRequest, RequestError, StreamingVideoPipeline
from pipelines.loading.lora import LoraChoice
from pipelines.loading.weights import WeightsError
from pipelines.memory.planner import GIB, plan_memory
from pipelines.model import compile_cache
from pipelines.model.acceleration import FP8_BLOCK_COMPILE_OPTIONS
from pipelines.model.fp8 import (
    Float8Linear,
    FP8Error,
    convert_block_linears,
    is_block_linear,
    quantize_blocks_fp8,
    quantize_fp8,
)
from pipelines.model.kv_cache import AttentionWindow, KVCache
from pipelines.model.transformer import CausalWanModel
from pipelines.settings import RuntimeSettings


def test_fp8_on_a_cpu_is_refused_with_what_it_needs(tiny_config, tiny_components):
    with pytest.raises(WeightsError, match="FP8 linear layers need a CUDA GPU"):
        build_pipeline(tiny_config, None, "cpu", fp8=True)
    with pytest.raises(FP8Error, match="need a CUDA GPU"):
        quantize_blocks_fp8(tiny_components.generator)
    assert all(type(block.ffn.net[0].proj) is nn.Linear for block in tiny_components.generator.blocks)


def _small_bf16_model() -> CausalWanModel:
    torch.manual_seed(0)
    model = CausalWanModel(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_len=16, text_dim=32)
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def test_fp8_linear_stays_within_quantization_error_of_the_bf16_linear():
    torch.manual_seed(0)
    linear = nn.Linear(256, 512).to(torch.bfloat16)
    x = torch.randn(3, 100, 256, dtype=torch.bfloat16) * torch.logspace(-1, 1, 100)[:, None].to(torch.bfloat16)
    fp8 = Float8Linear(linear)
    assert fp8.weight_fp8.dtype == torch.float8_e4m3fn and fp8.weight_fp8.shape == (512, 256)
    with torch.no_grad():
        exact, fast = linear(x).float(), fp8(x)
        values, scales = quantize_fp8(x)  # the product of the two quantized operands, in float32
        dequantized = (values.float() * scales.float()) @ (fp8.weight_fp8.float() * fp8.weight_scales.t()).t()
    assert fast.shape == (3, 100, 512) and fast.dtype == torch.bfloat16
    assert _relative(fast, dequantized + linear.bias.float()) < 0.01  # bf16 output rounding only
    assert 0 < _relative(fast, exact) < 0.06  # e4m3 keeps 3 mantissa bits: a few % per product
    shuffled = Float8Linear(nn.Linear(256, 512).to(torch.bfloat16))
    assert _relative(shuffled(x), exact) > 0.5  # control: other weights


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def test_compiled_fp8_blocks_are_one_graph_each_and_stay_close_to_bf16():
    """The FP8 layer is plain tensors and torch._scaled_mm: compiling the blocks gives no graph breaks and
    no new graphs for later blocks (torchao's tensor subclass never finished compiling on an H100)."""
    model = _small_bf16_model()
    latents = torch.randn(1, 16, 6, 8, 8)
    timesteps, text = torch.full((1, 3), 500.0), torch.randn(1, 16, 32)

    def two_blocks() -> list[torch.Tensor]:
        cache = KVCache(model.config.num_layers, 1, 6, 16, model.config.num_heads, model.head_dim,
                        AttentionWindow(), torch.bfloat16, "cpu")
        context = model.encode_context(text)
        return [model(latents[:, :, 3 * i:3 * i + 3], timesteps, context, start_frame=3 * i, kv_cache=cache).float()
                for i in range(2)]

    with torch.no_grad():
        exact = two_blocks()
        assert convert_block_linears(model) == 20
        torch._dynamo.reset()
        counters.clear()
        model.compile_blocks(options=FP8_BLOCK_COMPILE_OPTIONS, dynamic=False)
        fast = two_blocks()
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 2  # project_self, finish
    for got, want in zip(fast, exact):
        assert 0 < _relative(got, want) < 0.05


def test_app_with_fp8_on_a_cpu_shows_the_reason_instead_of_failing():
    from demo.runtime import load_runtime

    runtime = load_runtime("configs/tiny.yaml", None, "cpu", fp8=True)
    assert runtime.engine.pipeline is None and "FP8 linear layers need a CUDA GPU" in runtime.banner()
    runtime = load_runtime("configs/tiny.yaml", None, "cpu")
    assert "FP8" not in runtime.banner() and "FlashAttention" not in runtime.banner()
    engine = runtime.engine
    engine.pipeline = engine.pipeline.with_settings(RuntimeSettings(fp8_linears=True, attention="sdpa+flash4"))
    runtime.info = runtime.backend.info()  # (as on a GPU with both)
    assert "**FP8 linear layers (experimental):**" in runtime.banner()
    assert "FlashAttention-4 or SDPA" in runtime.banner()


def test_only_the_transformer_blocks_linears_are_converted(tiny_components):
    generator = tiny_components.generator
    chosen = {name for name, module in generator.named_modules() if is_block_linear(module, name)}
    per_block = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"}
    assert chosen == {f"blocks.{i}.{name}" for i in range(len(generator.blocks)) for name in per_block}
    assert "proj_out" not in chosen and "condition_embedder.time_proj" not in chosen


def test_fp8_weights_are_never_planned_for_streaming():
    assert plan_memory(REAL, 8 * GIB, 21, 3).profile.stream_generator  # control: bf16 streams here
    kept = plan_memory(REAL, 8 * GIB, 21, 3, resident_generator=True)
    assert kept.profile.name == "medium" and not kept.profile.stream_generator
    with pytest.raises(ValueError, match="restart without --fp8"):
        plan_memory(REAL, 80 * GIB, 21, 3, requested="low", resident_generator=True)


def test_fast_path_is_named_and_loras_are_refused_on_fp8_weights(tiny_components, tiny_config, tmp_path):
    pipeline = StreamingVideoPipeline(tiny_components, tiny_config)
    exact = GenerationRequest("a red circle")
    assert pipeline.fast_path_note(exact) == ""
    assert pipeline.fast_path_note(GenerationRequest("a red circle", fast_decode=True)) == \
        "fast TAEHV decoder: frames differ slightly from the exact bf16 path"
    pipeline = pipeline.with_settings(RuntimeSettings(fp8_linears=True))  # as build_pipeline(fp8=True) on a GPU
    assert pipeline.fast_path_note(exact).startswith("FP8 linear layers (experimental): frames differ")
    with pytest.raises(RequestError, match="start it without --fp8"):
        pipeline.validate(GenerationRequest("a red circle", loras=(LoraChoice(str(tmp_path / "x.safetensors")),)))


def test_fp8_and_attention_options_in_both_command_lines(monkeypatch):
    from app import build_parser as app_parser
    from pipelines.cli import build_parser as cli_parser

    app_args, cli_args = app_parser().parse_args([]), cli_parser().parse_args(["--prompt", "x"])
    assert (app_args.attention, app_args.fp8, cli_args.attention, cli_args.fp8) == ("auto", False, "auto", False)
    monkeypatch.setenv("SF_FP8", "1")
    monkeypatch.setenv("SF_ATTENTION", "sdpa")
    args = app_parser().parse_args([])
    assert args.fp8 and args.attention == "sdpa"
    assert cli_parser().parse_args(["--prompt", "x", "--attention", "flash4"]).attention == "flash4"
    with pytest.raises(SystemExit):
        app_parser().parse_args(["--attention", "flash3"])


def test_cli_with_flash4_on_a_cpu_exits_with_the_reason(tmp_path, caplog):
    from pipelines.cli import main

    assert main(["--prompt", "a red circle", "--device", "cpu", "--attention", "flash4",
                 "--out", str(tmp_path / "x.mp4")]) == 2
    assert "FlashAttention-4 runs on CUDA GPUs only" in caplog.text
    assert not (tmp_path / "x.mp4").exists()


def test_compile_cache_also_keeps_flash_attention_kernels(tmp_path, monkeypatch):
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED",
                 "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    compile_cache.activate(tmp_path)
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(tmp_path / "flash_attn")
