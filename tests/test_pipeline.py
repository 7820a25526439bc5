"""Behaviour of the generate() API: streaming, seeds, I2V, cancellation, samplers, bad input."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from PIL import Image

from pipelines.core import GenerationRequest, RequestError, StreamingVideoPipeline, prepare_image
from pipelines.model.transformer import CausalWanModel
from pipelines.scheduler import FewStepSchedule

from streams import block_frames


def _frames(pipeline, request):
    return block_frames(pipeline.generate(request))


def test_blocks_stream_with_wan_frame_counts(tiny_pipeline):
    results = list(tiny_pipeline.generate(GenerationRequest("waves", seed=0, num_blocks=3)))
    # The first video frame is sent alone as soon as it is decoded, then the rest of block 0.
    assert [(r.index, r.complete, r.frames.shape[0]) for r in results] == [(0, False, 1), (0, True, 8),
                                                                            (1, True, 12), (2, True, 12)]
    assert [f.shape for f in block_frames(results)] == [(9, 64, 96, 3), (12, 64, 96, 3), (12, 64, 96, 3)]
    assert all(r.frames.dtype == np.uint8 for r in results)
    assert [r.elapsed_s for r in results] == sorted(r.elapsed_s for r in results)
    assert results[0].latents is None and all(r.latents.shape[2] == 3 for r in results[1:])
    assert all(r.decode_s > 0 for r in results)
    assert [r.denoise_s > 0 for r in results] == [True, False, True, True]


def test_frames_are_sent_before_the_cache_write_and_the_last_block_writes_none(tiny_pipeline):
    """Each block's clean frames go through the generator once more to fill the KV cache; only the
    next block reads it, so a block's frames do not wait for that pass and the last block skips it."""
    calls = []
    hook = tiny_pipeline.generator.register_forward_hook(lambda *_: calls.append(1))
    try:
        seen = [(result.complete, len(calls)) for result in
                tiny_pipeline.generate(GenerationRequest("waves", seed=0, num_blocks=3))]
    finally:
        hook.remove()
    steps = len(tiny_pipeline.config.sampler.denoising_steps)
    assert seen == [(False, steps), (True, steps), (True, 2 * steps + 1), (True, 3 * steps + 2)]


def test_seed_reproducible_and_distinct(tiny_pipeline):
    a = _frames(tiny_pipeline, GenerationRequest("waves", seed=11, num_blocks=2))
    b = _frames(tiny_pipeline, GenerationRequest("waves", seed=11, num_blocks=2))
    c = _frames(tiny_pipeline, GenerationRequest("waves", seed=12, num_blocks=2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_prompt_changes_video(tiny_pipeline):
    a = _frames(tiny_pipeline, GenerationRequest("a red circle moves right on a black background", seed=1,
                                                 num_blocks=1))[0]
    b = _frames(tiny_pipeline, GenerationRequest("a green square moves left on a brown background", seed=1,
                                                 num_blocks=1))[0]
    assert not np.array_equal(a, b)


def test_i2v_first_frame_is_the_image_through_the_vae(tiny_pipeline, tiny_components):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (100, 150, 3), dtype=np.uint8))
    results = list(tiny_pipeline.generate(GenerationRequest("move", seed=2, num_blocks=2, image=image)))
    assert [(r.index, r.complete, r.frames.shape[0]) for r in results] == [(0, False, 1), (0, True, 12),
                                                                            (1, True, 12)]
    assert results[0].denoise_s == 0  # the image frame is shown before any denoising
    pixels = prepare_image(image, 64, 96)
    roundtrip = tiny_components.vae.decode(tiny_components.vae.encode(pixels))
    expected = ((roundtrip[0, :, 0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    np.testing.assert_allclose(results[0].frames[0].astype(int), expected.astype(int), atol=1)
    t2v = _frames(tiny_pipeline, GenerationRequest("move", seed=2, num_blocks=2))
    assert not np.array_equal(t2v[0][0], results[0].frames[0])


def test_prepare_image_covers_and_crops():
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    tensor = prepare_image(image, 64, 96)
    assert tensor.shape == (1, 3, 1, 64, 96)
    assert torch.allclose(tensor[0, :, 0, 10, 10], torch.tensor([1.0, -1.0, -1.0]))


def test_cancel_stops_between_blocks(tiny_pipeline):
    seen = []
    for result in tiny_pipeline.generate(GenerationRequest("x", seed=0, num_blocks=5), cancel=lambda: len(seen) >= 2):
        if result.complete:
            seen.append(result.index)
    assert seen == [0, 1]


@pytest.mark.parametrize("request_kwargs,message", [
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "ok", "num_blocks": 0}, "blocks"),
    ({"prompt": "ok", "num_blocks": 999}, "blocks"),
    ({"prompt": "ok", "height": 70}, "multiples of 16"),
    ({"prompt": "ok", "height": 480, "width": 832}, "between 16 and 256"),  # (the tiny config's max_side)
])
def test_bad_requests_raise_user_facing_errors(tiny_pipeline, request_kwargs, message):
    with pytest.raises(RequestError, match=message):
        next(tiny_pipeline.generate(GenerationRequest(**request_kwargs)))


def test_other_resolution(tiny_pipeline):
    frames = _frames(tiny_pipeline, GenerationRequest("x", num_blocks=1, height=48, width=80))
    assert frames[0].shape == (9, 48, 80, 3)


def test_few_step_schedule_matches_self_forcing():
    schedule = FewStepSchedule([1000, 750, 500, 250], shift=5.0)
    assert torch.allclose(schedule.steps, torch.tensor([1000.0, 937.5, 833.3333, 625.0]), atol=1e-3)
    x0 = torch.randn(2, 3)
    noise = torch.randn(2, 3)
    noisy = schedule.add_noise(x0, noise, 937.5)
    assert torch.allclose(schedule.to_x0(noise - x0, noisy, 937.5), x0, atol=1e-5)


def test_multistep_cfg_sampler(tiny_pipeline):
    sampler = dataclasses.replace(tiny_pipeline.config.sampler, kind="multi_step", num_steps=3, guidance_scale=3.0)
    pipeline = StreamingVideoPipeline(tiny_pipeline.components, dataclasses.replace(tiny_pipeline.config, sampler=sampler))
    a = _frames(pipeline, GenerationRequest("waves", seed=4, num_blocks=2))
    b = _frames(pipeline, GenerationRequest("waves", seed=4, num_blocks=2))
    assert [f.shape[0] for f in a] == [9, 12] and all(np.array_equal(x, y) for x, y in zip(a, b))
    neg = _frames(pipeline, GenerationRequest("waves", seed=4, num_blocks=2, negative_prompt="something else"))
    assert not np.array_equal(a[0], neg[0])


def test_model_matches_diffusers_wan_transformer():
    """Full bidirectional pass equals diffusers' WanTransformer3DModel with the same weights."""
    torch.manual_seed(0)
    ours = CausalWanModel(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=16)
    theirs = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=32, text_dim=32, ffn_dim=128, num_layers=2)
    state = {k: torch.randn_like(v) * 0.2 for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(state)
    ours.load_state_dict(state)
    x, t, text = torch.randn(1, 16, 5, 8, 8), torch.tensor([700.0]), torch.randn(1, 16, 32)
    with torch.no_grad():
        expected = theirs(x, t, text, return_dict=False)[0]
        got = ours(x, t[:, None].expand(1, 5), ours.encode_context(text))
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_prompt_padding_is_zeroed(tiny_components, tiny_config):
    embeds = tiny_components.prompt_encoder.encode("a red circle")
    length = len(tiny_components.prompt_encoder.tokenizer("a red circle").input_ids)
    assert embeds.shape == (1, tiny_config.text_encoder["text_len"], tiny_config.text_encoder["d_model"])
    assert embeds[0, length:].abs().sum() == 0 and embeds[0, :length].abs().sum() > 0



def test_warm_up_runs_every_compiled_shape_at_the_default_size(tiny_pipeline, monkeypatch):
    """The app's compile warm-up must cover text-only blocks and the 1-frame image prefill, to the end."""
    from pipelines.builder import warm_up

    finished = []
    generate = tiny_pipeline.generate

    def recording(request, cancel=None):
        results = list(generate(request, cancel))
        finished.append((request, results))
        yield from results

    monkeypatch.setattr(tiny_pipeline, "generate", recording)
    warm_up(tiny_pipeline)
    assert [request.image is not None for request, _ in finished] == [False, True]
    config = tiny_pipeline.config
    for request, results in finished:
        assert results[-1].complete and results[-1].index == results[-1].num_blocks - 1
        assert results[-1].frames.shape[1:3] == (config.height, config.width)
    text_results = finished[0][1]
    assert [r.complete for r in text_results] == [False] + [True] * config.num_blocks  # first frame alone, then blocks


def test_geometry_comes_from_the_configs(tiny_config):
    """VAE strides as diffusers' AutoencoderKLWan names them, the patch size, and what follows from them."""
    assert (tiny_config.vae_scale_factor_spatial, tiny_config.vae_scale_factor_temporal) == (8, 4)
    assert tiny_config.size_multiple == 16 and tiny_config.video_frames_per_block == 12
    assert tiny_config.latent_size(64, 96) == (8, 12)
    wide = dataclasses.replace(tiny_config, vae={**tiny_config.vae, "scale_factor_spatial": 16})
    assert wide.latent_size(64, 96) == (4, 6) and wide.size_multiple == 32
