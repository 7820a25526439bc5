"""Real loaders on tiny checkpoints written in each on-disk layout."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers

from pipelines.core import GenerationRequest, StreamingVideoPipeline
from pipelines.loading.weights import WeightsError, load_components

from tiny_checkpoints import (
    dit_key_to_original,
    vae_key_to_original,
    write_diffusers_layout,
    write_original_layout,
    write_self_forcing_checkpoint,
)

SF_CKPT = "checkpoints/self_forcing_dmd.pt"


def _with_weights(config, **weights):
    weights.setdefault("generator_ckpt", SF_CKPT)
    return dataclasses.replace(config, weights=dataclasses.replace(config.weights, **weights))


def _video(components, config, seed=5):
    pipeline = StreamingVideoPipeline(components, config)
    return np.concatenate([r.frames for r in pipeline.generate(GenerationRequest("a boat at dawn", seed=seed))])


@pytest.fixture(scope="module")
def reference_video(random_components, random_config):
    return _video(random_components, random_config)


def test_fixture_keys_are_the_original_names(random_components):
    """diffusers' own converters map the written original names back onto every tensor."""
    for module, to_original, convert in ((random_components.generator, dit_key_to_original,
                                          convert_wan_transformer_to_diffusers),
                                         (random_components.vae.model, vae_key_to_original, convert_wan_vae_to_diffusers)):
        state = module.state_dict()
        back = convert({to_original(k): v for k, v in state.items()})
        assert set(back) == set(state)
        assert all(back[k] is state[k] for k in state)


@pytest.mark.parametrize("layout", ["original", "diffusers"])
@pytest.mark.parametrize("generator_ckpt", [None, SF_CKPT])
def test_layouts_load_to_identical_outputs(tmp_path, random_components, random_config, reference_video, layout,
                                           generator_ckpt):
    writer = write_original_layout if layout == "original" else write_diffusers_layout
    writer(random_components, tmp_path)
    config = _with_weights(random_config, layout="auto", generator_ckpt=generator_ckpt)
    loaded = load_components(config, tmp_path)
    assert layout in loaded.description or str(tmp_path) in loaded.description
    np.testing.assert_array_equal(_video(loaded, config), reference_video)


def test_use_ema_selects_generator_ema(tmp_path, random_components, random_config):
    write_original_layout(random_components, tmp_path)
    write_self_forcing_checkpoint(random_components, tmp_path / "checkpoints" / "self_forcing_dmd.pt", ema_offset=0.5)
    ema = load_components(_with_weights(random_config, layout="auto", use_ema=True), tmp_path)
    plain = load_components(_with_weights(random_config, layout="auto", use_ema=False), tmp_path)
    w_ema = ema.generator.proj_out.weight
    w_plain = plain.generator.proj_out.weight
    assert torch.allclose(w_ema - w_plain, torch.full_like(w_ema, 0.5))


def test_missing_generator_checkpoint_names_file_and_download(tmp_path, random_components, random_config):
    write_original_layout(random_components, tmp_path)
    (tmp_path / "checkpoints" / "self_forcing_dmd.pt").unlink()
    with pytest.raises(WeightsError) as err:
        load_components(_with_weights(random_config, layout="auto"), tmp_path)
    assert "self_forcing_dmd.pt" in str(err.value) and "gdhe17/Self-Forcing" in str(err.value)


def test_missing_vae_file_is_named(tmp_path, random_components, random_config):
    write_original_layout(random_components, tmp_path)
    (tmp_path / "wan_models" / "Wan2.1-T2V-1.3B" / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(WeightsError, match=r"Wan2\.1_VAE\.pth.*Wan-AI/Wan2\.1-T2V-1\.3B"):
        load_components(_with_weights(random_config, layout="auto"), tmp_path)


def test_wrong_shape_names_file_and_tensor(tmp_path, random_components, random_config):
    write_original_layout(random_components, tmp_path)
    ckpt = tmp_path / "checkpoints" / "self_forcing_dmd.pt"
    state = torch.load(ckpt)
    state["generator"]["model.head.head.weight"] = torch.zeros(3, 3)
    torch.save(state, ckpt)
    with pytest.raises(WeightsError) as err:
        load_components(_with_weights(random_config, layout="auto"), tmp_path)
    message = str(err.value)
    assert "self_forcing_dmd.pt" in message and "proj_out.weight" in message and "(3, 3)" in message


def test_truncated_file_is_reported(tmp_path, random_components, random_config):
    write_original_layout(random_components, tmp_path)
    t5 = tmp_path / "wan_models" / "Wan2.1-T2V-1.3B" / "models_t5_umt5-xxl-enc-bf16.pth"
    t5.write_bytes(t5.read_bytes()[:100])
    with pytest.raises(WeightsError, match="models_t5_umt5-xxl-enc-bf16.pth"):
        load_components(_with_weights(random_config, layout="auto"), tmp_path)


def test_empty_folder_says_what_to_download(tmp_path, random_config):
    with pytest.raises(WeightsError, match="Wan-AI/Wan2.1-T2V-1.3B"):
        load_components(_with_weights(random_config, layout="auto"), tmp_path)


def test_no_folder_for_real_model_says_how_to_point(random_config):
    with pytest.raises(WeightsError, match="--weights"):
        load_components(_with_weights(random_config, layout="auto"), None)
