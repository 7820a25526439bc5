"""The TAEHV-architecture fast decoder: the public taew2_1 layout, streaming, and the pipeline option."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipelines.core import GenerationRequest, RequestError
from pipelines.loading.tiny_decoder import TinyVideoDecoder


def taew2_1_shapes(time_grow_0: int = 256) -> dict[str, tuple[int, ...]]:
    """Key -> shape of taew2_1.pth (madebyollin/taehv): nn.Sequential indices of TAEHV's encoder and
    decoder for 16-channel Wan 2.1 latents, widths 256/128/64/64."""
    shapes: dict[str, tuple[int, ...]] = {"encoder.0.weight": (64, 3, 3, 3), "encoder.0.bias": (64,),
                                          "encoder.22.weight": (16, 64, 3, 3), "encoder.22.bias": (16,)}
    shapes.update({"decoder.1.weight": (256, 16, 3, 3), "decoder.1.bias": (256,)})
    for first, width, grow, nxt in ((3, 256, time_grow_0, 128), (9, 128, 256, 64), (15, 64, 128, 64)):
        for block in range(first, first + 3):
            for conv, inputs in ((0, 2 * width), (2, width), (4, width)):
                shapes[f"decoder.{block}.conv.{conv}.weight"] = (width, inputs, 3, 3)
                shapes[f"decoder.{block}.conv.{conv}.bias"] = (width,)
        shapes[f"decoder.{first + 4}.conv.weight"] = (grow, width, 1, 1)
        shapes[f"decoder.{first + 5}.weight"] = (nxt, width, 3, 3)
    shapes.update({"decoder.22.weight": (3, 64, 3, 3), "decoder.22.bias": (3,)})
    return shapes


def taew2_1_state(seed: int = 0, time_grow_0: int = 256) -> dict[str, torch.Tensor]:
    rng = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in taew2_1_shapes(time_grow_0).items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        state[key] = torch.randn(shape, generator=rng) / fan_in**0.5 if len(shape) > 1 else \
            0.05 * torch.randn(shape, generator=rng)
    return state


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("taehv") / "taew2_1.pth"
    torch.save(taew2_1_state(), path)
    return TinyVideoDecoder.from_file(path)


def test_loads_the_public_layout_and_refuses_other_files(tmp_path):
    decoded_keys = {k for k in taew2_1_shapes() if k.startswith("decoder.")}
    assert set(TinyVideoDecoder().state_dict()) == decoded_keys
    # a checkpoint whose first time-grow layer was trained with stride 2 keeps its last frame's channels
    state = taew2_1_state(time_grow_0=512)
    torch.save(state, tmp_path / "taew2_1.pth")
    loaded = TinyVideoDecoder.from_file(tmp_path / "taew2_1.pth")
    assert torch.equal(loaded.decoder[7].conv.weight, state["decoder.7.conv.weight"][256:])

    from pipelines.loading.weights import WeightsError

    del state["decoder.9.conv.2.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match=r"broken.pth.*decoder.9.conv.2.weight.*madebyollin/taehv"):
        TinyVideoDecoder.from_file(tmp_path / "broken.pth")


def test_block_by_block_equals_one_pass_and_gives_wans_frame_count(decoder):
    latents = torch.randn(1, 16, 9, 4, 6, generator=torch.Generator().manual_seed(1))
    whole = decoder.stream().decode_block(latents)
    assert whole.shape == (1, 3, 1 + 4 * 8, 32, 48)
    assert whole.min() >= -1 and whole.max() <= 1 and whole.std() > 0.01
    stream = decoder.stream()
    blocks = [stream.decode_block(latents[:, :, i:i + 3]) for i in (0, 3, 6)]
    assert [b.shape[2] for b in blocks] == [9, 12, 12]
    torch.testing.assert_close(torch.cat(blocks, 2), whole, rtol=0, atol=1e-5)
    single = decoder.stream()
    frames = torch.cat([single.decode_block(latents[:, :, i:i + 1]) for i in range(9)], 2)
    torch.testing.assert_close(frames, whole, rtol=0, atol=1e-5)


def test_decoding_is_causal_and_streams_do_not_share_state(decoder):
    rng = torch.Generator().manual_seed(2)
    a, b = torch.randn(1, 16, 6, 4, 6, generator=rng), torch.randn(1, 16, 6, 4, 6, generator=rng)
    changed = a.clone()
    changed[:, :, 4] += 1.0
    out_a, out_changed = decoder.stream().decode_block(a), decoder.stream().decode_block(changed)
    first_affected = 1 + 4 * 3  # latent frame 4 decodes to video frames 13..16
    assert torch.equal(out_a[:, :, :first_affected], out_changed[:, :, :first_affected])
    assert not torch.equal(out_a[:, :, first_affected:], out_changed[:, :, first_affected:])
    one, two = decoder.stream(), decoder.stream()  # interleaved, as two sessions would run
    first_a, first_b = one.decode_block(a[:, :, :3]), two.decode_block(b[:, :, :3])
    rest_a, rest_b = one.decode_block(a[:, :, 3:]), two.decode_block(b[:, :, 3:])
    torch.testing.assert_close(torch.cat([first_a, rest_a], 2), out_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([first_b, rest_b], 2), decoder.stream().decode_block(b), rtol=0, atol=1e-5)


def test_the_pipeline_decodes_with_it_on_request(tmp_path, tiny_config):
    from pipelines.builder import build_pipeline
    from pipelines.weights_inspector import inspect_folder

    bare, _ = build_pipeline(tiny_config, None, "cpu")
    with pytest.raises(RequestError, match="taew2_1.pth"):
        bare.validate(GenerationRequest("a red circle", fast_decode=True))
    torch.save(taew2_1_state(), tmp_path / "taew2_1.pth")
    pipeline, _ = build_pipeline(tiny_config, tmp_path, "cpu")
    assert pipeline.fast_decoder is not None
    full = [r.frames for r in pipeline.generate(GenerationRequest("a red circle", seed=3, num_blocks=2))]
    fast = [r.frames for r in pipeline.generate(GenerationRequest("a red circle", seed=3, num_blocks=2,
                                                                  fast_decode=True))]
    assert [f.shape for f in fast] == [f.shape for f in full]
    assert not np.array_equal(np.concatenate(fast), np.concatenate(full))
    finding = next(f for f in inspect_folder(tmp_path).findings if f.path == "taew2_1.pth")
    assert finding.supported and "--fast-decoder" in finding.detail


def test_warm_up_runs_the_fast_decoder_too(tmp_path, tiny_config, monkeypatch):
    """Its convs are tuned on first use (seconds on a GPU): the start-up warm-up pays that, not a user."""
    from pipelines.builder import build_pipeline, warm_up

    torch.save(taew2_1_state(), tmp_path / "taew2_1.pth")
    pipeline, _ = build_pipeline(tiny_config, tmp_path, "cpu")
    requests = []
    generate = pipeline.generate
    monkeypatch.setattr(pipeline, "generate", lambda request, **kw: requests.append(request) or generate(request, **kw))
    warm_up(pipeline)
    assert [r.fast_decode for r in requests] == [False, False, True]
    assert requests[1].image is not None
    without = pipeline.with_settings(dataclasses.replace(pipeline.settings, fast_decoder=None))
    generate = without.generate
    monkeypatch.setattr(without, "generate", lambda request, **kw: requests.append(request) or generate(request, **kw))
    requests.clear()
    warm_up(without)
    assert [r.fast_decode for r in requests] == [False, False]


def test_the_app_offers_it_when_the_file_is_there(tmp_path):
    from demo.runtime import load_runtime

    assert not load_runtime("configs/tiny.yaml", None, "cpu").info.fast_decoder
    torch.save(taew2_1_state(), tmp_path / "taew2_1.pth")
    assert load_runtime("configs/tiny.yaml", str(tmp_path), "cpu").info.fast_decoder


@pytest.fixture(scope="module")
def fast_app(tmp_path_factory):
    from app_server import AppServer

    weights = tmp_path_factory.mktemp("weights")
    torch.save(taew2_1_state(), weights / "taew2_1.pth")
    server = AppServer("--weights", str(weights))
    yield server
    server.stop()


def test_api_fast_run_then_full_vae_redecode_gives_the_normal_video(fast_app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from pipelines.loading.media import read_video

    client = Client(fast_app.url, verbose=False)
    args = ("", 5, False, 2, 16, "96x64")
    with pytest.raises(AppError, match="Nothing to re-decode"):
        client.predict(api_name="/redecode_text_to_video")
    fast = client.predict("a lighthouse", *args, fast_decode=True, api_name="/text_to_video")
    path, status = client.predict(api_name="/redecode_text_to_video")
    assert status.startswith("Re-decoded with the full Wan VAE: 21 frames")
    normal = client.predict("a lighthouse", *args, api_name="/text_to_video")
    assert "fast TAEHV decoder: frames differ" in fast[2] and "TAEHV" not in normal[2]  # the API's status names it
    fast_frames, redecoded, normal_frames = (np.stack(read_video(p)).astype(float) for p in (fast[3], path, normal[3]))
    assert fast_frames.shape == redecoded.shape == normal_frames.shape == (21, 64, 96, 3)
    # generation does not depend on the decoder: the re-decoded video is the normal one (up to H.264)
    assert np.abs(redecoded - normal_frames).mean() < 1.0 < np.abs(fast_frames - normal_frames).mean()
