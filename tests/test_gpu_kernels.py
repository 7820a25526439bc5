"""Kernel choices that only exist on CUDA must compute what the CPU path computes (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipelines.model.transformer import FeedForward

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_fused_gelu_epilogue_matches_tanh_gelu():
    torch.manual_seed(0)
    ffn = FeedForward(256, 1024).cuda()
    x = torch.randn(2, 300, 256, device="cuda")
    up, down = ffn.net[0].proj, ffn.net[2]
    expected = down(F.gelu(up(x), approximate="tanh"))
    assert torch.allclose(ffn(x), expected, atol=1e-5, rtol=1e-4)
    exact = down(F.gelu(up(x)))
    assert not torch.allclose(exact, expected, atol=1e-6, rtol=0)  # control: the approximation is visible


def test_flash_attention_4_matches_sdpa_at_streaming_shapes():
    pytest.importorskip("flash_attn.cute", reason="flash-attn-4 not installed")
    from pipelines.model.attention_kernels import agree, load_flash4, sdpa

    flash4 = load_flash4()
    torch.manual_seed(0)
    for queries, keys in ((1560, 1560), (4680, 14040), (4680, 512)):
        q = torch.randn(1, queries, 12, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, keys, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        assert agree(flash4(q, k, v), sdpa(q, k, v))
        assert not agree(flash4(q, k, v.roll(1, dims=1)), sdpa(q, k, v))  # control: the check can fail


def test_fp8_blocks_stay_close_to_bf16_eager_and_compiled():
    from pipelines.model.acceleration import FP8_BLOCK_COMPILE_OPTIONS
    from pipelines.model.fp8 import FP8Error, quantize_blocks_fp8
    from pipelines.model.transformer import CausalWanModel

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9+")
    torch.manual_seed(0)
    model = CausalWanModel(dim=256, ffn_dim=1024, num_heads=2, num_layers=2, text_len=32, text_dim=64)
    with pytest.raises(FP8Error, match="need a bfloat16 model"):
        quantize_blocks_fp8(model.to("cuda"))
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    latents = torch.randn(1, 16, 3, 16, 16, device="cuda")
    timesteps = torch.full((1, 3), 500.0, device="cuda")
    text = torch.randn(1, 32, 64, device="cuda")
    with torch.no_grad():
        exact = model(latents, timesteps, model.encode_context(text)).float()
        assert quantize_blocks_fp8(model) == 20
        fast = model(latents, timesteps, model.encode_context(text)).float()
        model.compile_blocks(options=FP8_BLOCK_COMPILE_OPTIONS, dynamic=False)
        compiled = model(latents, timesteps, model.encode_context(text)).float()
    for output in (fast, compiled):
        relative = ((output - exact).norm() / exact.norm()).item()
        assert 0 < relative < 0.05  # FP8 ran (not bit-identical) and stayed close
