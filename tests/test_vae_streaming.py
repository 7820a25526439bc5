"""Streaming (block-by-block) VAE decode must give the frames of a one-shot decode."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.loading.vae import frames_for_latents, to_uint8_frames


def _split_decode(vae, latents, splits):
    """Streams latents through one decoder in blocks of the given lengths; returns each block's pixels."""
    stream, pieces, start = vae.stream(), [], 0
    for size in splits:
        pieces.append(stream.decode_block(latents[:, :, start:start + size]))
        start += size
    return pieces


@pytest.mark.parametrize("splits", [[3, 3, 3, 3], [1, 3, 3], [2, 5, 1], [7]])
def test_streamed_decode_equals_full_decode(tiny_components, splits):
    vae = tiny_components.vae
    torch.manual_seed(sum(splits))
    latents = torch.randn(1, 16, sum(splits), 8, 12)
    full = vae.decode(latents)
    pieces = _split_decode(vae, latents, splits)
    for piece, start, size in zip(pieces, np.cumsum([0] + splits), splits):
        assert piece.shape[2] == frames_for_latents(start + size) - frames_for_latents(start)
    streamed = torch.cat(pieces, dim=2)
    assert streamed.shape == full.shape == (1, 3, frames_for_latents(sum(splits)), 64, 96)
    assert (streamed - full).abs().max().item() <= 1e-4


def test_stream_without_carried_cache_differs(tiny_components):
    """Control: decoding the second block with a fresh decoder is not the same video."""
    vae = tiny_components.vae
    latents = torch.randn(1, 16, 6, 8, 12)
    full = vae.decode(latents)
    fresh = vae.stream().decode_block(latents[:, :, 3:])
    assert fresh.shape[2] != full[:, :, 9:].shape[2] or not torch.allclose(fresh, full[:, :, 9:], atol=1e-3)


def test_frames_for_latents_matches_wan_ratio():
    assert [frames_for_latents(n) for n in (0, 1, 3, 21)] == [0, 1, 9, 81]


def test_uint8_conversion_range():
    pixels = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 4, 1, 1).expand(1, 3, 4, 1, 1)
    frames = to_uint8_frames(pixels)
    assert frames.shape == (4, 1, 1, 3) and frames.dtype == np.uint8
    assert frames[:, 0, 0, 0].tolist() == [0, 128, 255, 255]



@pytest.fixture()
def sped_up_vae(tiny_config):
    """A private copy of the tiny VAE with the GPU speed rewrites applied (kernel padding, traceable upsampler)."""
    from pipelines.loading.weights import load_components
    from pipelines.model.acceleration import make_upsamplers_traceable, pad_vae_convs_in_kernel

    vae = load_components(tiny_config).vae
    pad_vae_convs_in_kernel(vae.model)
    make_upsamplers_traceable(vae.model)
    return vae


def test_speed_rewrites_give_the_same_video(tiny_components, sped_up_vae):
    """In-kernel spatial padding and the traceable time upsampler must not change any frame."""
    assert any(getattr(m, "padding", None) == (0, 1, 1) for m in sped_up_vae.model.modules())
    torch.manual_seed(3)
    latents = torch.randn(1, 16, 6, 8, 12)
    expected = tiny_components.vae.stream().decode_block(latents)
    for splits in ([1, 2, 3], [2, 4], [1, 1, 1, 3]):
        assert (torch.cat(_split_decode(sped_up_vae, latents, splits), dim=2) - expected).abs().max().item() <= 1e-5
    pixels = torch.rand(1, 3, 5, 64, 96) * 2 - 1
    assert torch.allclose(sped_up_vae.encode(pixels), tiny_components.vae.encode(pixels), atol=1e-5)


def test_compiled_decoder_traces_without_breaks_and_never_recompiles(sped_up_vae):
    """The second generation must reuse the first one's graphs (on torch 2.11 it recompiled for ~35 s)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    sped_up_vae.model.decoder.compile(backend="eager", dynamic=False)
    latents = torch.randn(1, 16, 7, 8, 12)
    _split_decode(sped_up_vae, latents, [1, 2, 3, 1])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0 and not counters["graph_break"]
    _split_decode(sped_up_vae, latents, [1, 3, 1, 2])  # other block lengths: same per-frame graphs
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def _frames_seen_by_last_stage(vae, decode):
    """Largest number of video frames that the full-resolution up block received in one call."""
    seen = []
    handle = vae.model.decoder.up_blocks[-1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[2]))
    try:
        result = decode()
    finally:
        handle.remove()
    return result, max(seen)


@pytest.mark.parametrize("splits", [[1, 3, 3], [3, 3], [2, 5]])
def test_frame_by_frame_decode_equals_streamed_decode(tiny_components, splits):
    """The low-VRAM decode (one video frame at a time after each time upsampling) gives the same
    pixels as the ordinary streaming decode: causal convs with a cache do not depend on chunk length."""
    vae = tiny_components.vae
    torch.manual_seed(len(splits))
    latents = torch.randn(1, 16, sum(splits), 8, 12)

    def decode(frame_by_frame):
        stream, pieces, start = vae.stream(frame_by_frame), [], 0
        for size in splits:
            pieces.append(stream.decode_block(latents[:, :, start:start + size]))
            start += size
        return torch.cat(pieces, dim=2)

    whole, whole_frames = _frames_seen_by_last_stage(vae, lambda: decode(False))
    chunked, chunked_frames = _frames_seen_by_last_stage(vae, lambda: decode(True))
    assert (whole_frames, chunked_frames) == (4, 1)  # the transient activations really are 4x smaller
    assert chunked.shape == whole.shape
    # fp32 on the CPU: identical; cuDNN may pick other algorithms for 1-frame shapes (rounding only).
    assert (chunked - whole).abs().max().item() <= 1e-6
