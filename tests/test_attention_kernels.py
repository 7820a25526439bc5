"""The per-shape self-attention kernel choice (FlashAttention-4 or SDPA) and its routing through the model.

FlashAttention-4 itself needs a Hopper GPU (tests/test_gpu_kernels.py); here a stand-in kernel that
computes attention in FA4's [B, L, H, D] layout proves that the model hands it the right tensors,
with and without compiled block parts, and that the tuner keeps the faster agreeing kernel per shape.
"""
from __future__ import annotations

import pytest
import torch

from pipelines.core import GenerationRequest, StreamingVideoPipeline
from pipelines.loading.weights import load_components
from pipelines.model.attention_kernels import AttentionKernelError, ShapeTunedAttention, enable_attention_kernels, sdpa


def attention_blhd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention written directly in [B, L, H, D] (FA4's layout), no transposes."""
    scores = torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) / q.shape[-1] ** 0.5
    return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v.float()).to(q.dtype)


class Recorder:
    """A candidate kernel that remembers the shapes it ran."""

    def __init__(self, kernel=attention_blhd) -> None:
        self.kernel, self.shapes = kernel, []

    def __call__(self, q, k, v):
        self.shapes.append((tuple(q.shape), tuple(k.shape)))
        return self.kernel(q, k, v)


def fixed_timer(ms: dict[str, float]):
    def timer(kernel, q, k, v):
        return ms[next(name for name, candidate in timer.tuner.candidates.items() if candidate is kernel)]
    return timer


def tuner_with(candidates: dict, ms: dict[str, float]) -> ShapeTunedAttention:
    timer = fixed_timer(ms)
    tuner = ShapeTunedAttention(candidates, timer=timer)
    timer.tuner = tuner
    return tuner


def qkv(queries: int, keys: int, heads: int = 2, head_dim: int = 16):
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, length, heads, head_dim, generator=gen) for length in (queries, keys, keys))


def test_tuner_keeps_the_faster_agreeing_kernel_per_shape():
    fast = Recorder()
    tuner = tuner_with({"fast": fast}, {"sdpa": 2.0, "fast": 1.0})
    q, k, v = qkv(8, 24)
    out = tuner(q, k, v)
    assert torch.allclose(out, sdpa(q, k, v), atol=1e-5)
    assert tuner.choice[((1, 8, 2, 16), (1, 24, 2, 16), torch.float32, q.device)] == "fast"
    calls = len(fast.shapes)
    tuner(q, k, v)
    assert len(fast.shapes) == calls + 1  # tuned once: later calls run the winner only

    slow = tuner_with({"fast": Recorder()}, {"sdpa": 1.0, "fast": 3.0})
    slow(q, k, v)
    assert set(slow.choice.values()) == {"sdpa"}


def test_tuner_never_uses_a_kernel_that_disagrees_with_sdpa(caplog):
    wrong = Recorder(lambda q, k, v: attention_blhd(q, k, v) + 0.1)
    tuner = tuner_with({"wrong": wrong}, {"sdpa": 5.0, "wrong": 1.0})
    q, k, v = qkv(8, 24)
    assert torch.allclose(tuner(q, k, v), sdpa(q, k, v), atol=1e-6)
    assert set(tuner.choice.values()) == {"sdpa"}
    assert "disagrees with SDPA" in caplog.text


@pytest.fixture
def own_pipeline(tiny_config):
    """A pipeline with its own generator (the kernel routing changes modules; the shared one stays SDPA)."""
    pipeline = StreamingVideoPipeline(load_components(tiny_config), tiny_config)
    yield pipeline
    pipeline.generator.set_attention_kernel(None)


def frames_and_latents(pipeline: StreamingVideoPipeline, blocks: int = 2):
    results = list(pipeline.generate(GenerationRequest("a red circle moves to the right", seed=3,
                                                       num_blocks=blocks)))
    return torch.cat([r.latents for r in results if r.latents is not None], dim=2)


@pytest.mark.parametrize("compiled", [False, True])
def test_model_routes_self_attention_through_the_tuned_kernel(own_pipeline, compiled):
    generator = own_pipeline.generator
    reference = frames_and_latents(own_pipeline)
    stand_in = Recorder()
    generator.set_attention_kernel(tuner_with({"blhd": stand_in}, {"sdpa": 9.0, "blhd": 1.0}))
    if compiled:  # the app compiles the static block parts around the self-attention
        generator.compile_blocks(backend="aot_eager", dynamic=False)
    routed = frames_and_latents(own_pipeline)
    torch.testing.assert_close(routed, reference, atol=2e-4, rtol=1e-3)
    cfg = generator.config
    frame_tokens = generator.frame_tokens(*own_pipeline.config.latent_size())
    block_tokens = own_pipeline.config.frames_per_block * frame_tokens
    query_shapes = {shape[0][1] for shape in stand_in.shapes}
    key_lengths = {shape[1][1] for shape in stand_in.shapes}
    assert block_tokens in query_shapes
    assert {block_tokens, 2 * block_tokens} <= key_lengths  # the first block, then a cache of two
    assert cfg.text_len not in key_lengths  # the cross-attention stays on SDPA
    assert all(shape[0][2:] == (cfg.num_heads, generator.head_dim) for shape in stand_in.shapes)


def test_training_keeps_sdpa_with_autograd(own_pipeline):
    generator = own_pipeline.generator
    stand_in = Recorder()
    generator.set_attention_kernel(tuner_with({"blhd": stand_in}, {"sdpa": 9.0, "blhd": 1.0}))
    latents = torch.randn(1, generator.config.in_dim, 2, 8, 8, requires_grad=True)
    context = generator.encode_context(torch.randn(1, 4, generator.config.text_dim))
    generator(latents, torch.full((1, 2), 500.0), context).sum().backward()  # a training forward
    assert not stand_in.shapes
    with torch.no_grad():
        generator(latents, torch.full((1, 2), 500.0), context)
    assert stand_in.shapes  # control: the same forward without autograd uses it


def test_cpu_uses_sdpa_and_flash4_on_request_says_why_not(own_pipeline):
    generator = own_pipeline.generator
    assert enable_attention_kernels(generator, torch.device("cpu"), "auto") == "sdpa"
    assert generator.blocks[0].self_attention_kernel is None
    with pytest.raises(AttentionKernelError, match="FlashAttention-4 runs on CUDA GPUs only"):
        enable_attention_kernels(generator, torch.device("cpu"), "flash4")
    with pytest.raises(AttentionKernelError, match="Unknown attention kernel"):
        enable_attention_kernels(generator, torch.device("cpu"), "flash3")
