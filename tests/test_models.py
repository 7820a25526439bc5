"""The registry of causal generators: published settings, each checkpoint's exact on-disk layout
(tiny weights written as the projects write them), the models command, and switching in the app."""
from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipelines.config import CONFIG_DIR, load_config
from pipelines.core import GenerationRequest, StreamingVideoPipeline
from pipelines.loading.weights import WeightsError, load_components
from pipelines.registry import load_registry
from pipelines.registry import main as models_main

from tiny_checkpoints import dit_key_to_original, write_original_layout

TINY = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())


def test_registry_holds_the_published_settings():
    models = load_registry()
    assert list(models) == ["self_forcing_dmd", "self_forcing_sid", "causvid", "longlive", "causal_forcing_chunkwise",
                            "causal_forcing_framewise", "causal_forcing_framewise_2step",
                            "causal_forcing_framewise_1step", "reward_forcing",
                            "rolling_forcing"]
    published = {  # steps, warped, shift, frames per block, window, sink, checkpoint, EMA, LoRA
        "self_forcing_dmd": ([1000, 750, 500, 250], True, 5.0, 3, -1, 0, "checkpoints/self_forcing_dmd.pt", True, None),
        "self_forcing_sid": ([1000, 750, 500, 250], True, 5.0, 3, -1, 0, "checkpoints/self_forcing_sid.pt", True, None),
        "causvid": ([1000, 757, 522], False, 8.0, 3, -1, 0, "autoregressive_checkpoint/model.pt", False, None),
        "longlive": ([1000, 750, 500, 250], True, 5.0, 6, 12, 3, "longlive_models/models/longlive_base.pt", False,
                     "longlive_models/models/lora.pt"),
        "causal_forcing_chunkwise": ([1000, 750, 500, 250], True, 5.0, 3, -1, 0,
                                     "checkpoints/chunkwise/causal_forcing.pt", False, None),
        "causal_forcing_framewise": ([1000, 750, 500, 250], True, 5.0, 1, -1, 0,
                                     "checkpoints/framewise/causal_forcing.pt", True, None),
        "causal_forcing_framewise_2step": ([1000, 500], True, 5.0, 1, -1, 0,
                                           "checkpoints/causal-forcing++/framewise-2step.pt", True, None),
        "causal_forcing_framewise_1step": ([1000], True, 5.0, 1, -1, 0,
                                           "checkpoints/causal-forcing++/framewise-1step.pt", True, None),
        "reward_forcing": ([1000, 750, 500, 250], True, 5.0, 3, 9, 3,
                           "checkpoints/Reward-Forcing-T2V-1.3B/rewardforcing.pt", False, None),
        "rolling_forcing": ([1000, 800, 600, 400, 200], True, 5.0, 3, 21, 3, "checkpoints/rolling_forcing_dmd.pt",
                            True, None),
    }
    first_blocks = {"causal_forcing_framewise_2step": [1000, 750, 500, 250],
                    "causal_forcing_framewise_1step": [1000, 750, 500, 250]}
    for key, model in models.items():
        cfg = model.config
        got = (cfg.sampler.denoising_steps, cfg.sampler.warp_denoising_step, cfg.sampler.timestep_shift,
               cfg.frames_per_block, cfg.local_attn_size, cfg.sink_size, cfg.weights.generator_ckpt,
               cfg.weights.use_ema, cfg.weights.generator_lora)
        assert got == published[key], key
        assert cfg.sampler.first_block_steps == first_blocks.get(key), key
        assert cfg.num_blocks * cfg.frames_per_block in (21, 24)  # 81 video frames (LongLive: 93)
        assert cfg.model["dim"] == 1536 and cfg.model["num_layers"] == 30  # all Wan2.1-T2V-1.3B
        assert model.code.startswith("https://github.com/") and "hf download" in cfg.download
    assert load_config("causvid").name == models["causvid"].label  # --config takes a registered name
    with pytest.raises(ValueError, match="self_forcing_dmd"):
        load_config("no_such_model")


def _tiny_registry(folder: Path) -> Path:
    """The registry's configs on the tiny architecture (same files, sampler and window settings)."""
    entries = {}
    for key, model in load_registry().items():
        path = folder / f"{key}.yaml"
        path.write_text(yaml.safe_dump({"base": str(model.config_path), "model": TINY["model"], "vae": TINY["vae"],
                                        "text_encoder": TINY["text_encoder"], "dtype": "float32", "height": 64,
                                        "width": 96, "resolutions": ["96x64"], "max_blocks": 4}))
        entries[key] = {"config": path.name, "code": model.code}
    registry = folder / "models.yaml"
    registry.write_text(yaml.safe_dump({"models": entries}, sort_keys=False))
    return registry


def _original_state(components, offset: float) -> dict[str, torch.Tensor]:
    return {"model." + dit_key_to_original(k): v.detach().clone() + offset
            for k, v in components.generator.state_dict().items()}


def _write_checkpoints(components, weights: Path) -> dict[str, float]:
    """Each model's files in its project's layout; returns the offset its generator weights carry."""
    write_original_layout(components, weights)  # Wan2.1 base + checkpoints/self_forcing_dmd.pt
    torch.save({"generator": _original_state(components, 0.0), "generator_ema": _original_state(components, 0.25)},
               weights / "checkpoints" / "self_forcing_sid.pt")
    (weights / "autoregressive_checkpoint").mkdir()
    torch.save({"generator": _original_state(components, 0.5)}, weights / "autoregressive_checkpoint" / "model.pt")
    longlive = weights / "longlive_models" / "models"
    longlive.mkdir(parents=True)
    torch.save({"generator": _original_state(components, 0.75)}, longlive / "longlive_base.pt")
    # Causal Forcing: {generator, generator_ema}; the frame-wise 4-step file keeps FSDP's wrapper in its names.
    for folder in ("chunkwise", "framewise", "causal-forcing++"):
        (weights / "checkpoints" / folder).mkdir()
    torch.save({"generator": _original_state(components, 1.0), "generator_ema": _original_state(components, -1.0)},
               weights / "checkpoints" / "chunkwise" / "causal_forcing.pt")
    wrapped = {k.replace("model.", "model._fsdp_wrapped_module.", 1): v
               for k, v in _original_state(components, 1.25).items()}
    torch.save({"generator": _original_state(components, -1.0), "generator_ema": wrapped},
               weights / "checkpoints" / "framewise" / "causal_forcing.pt")
    for name, offset in (("framewise-2step.pt", 1.5), ("framewise-1step.pt", 1.75)):
        torch.save({"generator": _original_state(components, -1.0), "generator_ema": _original_state(components, offset)},
                   weights / "checkpoints" / "causal-forcing++" / name)
    # Reward Forcing: the generator wrapper's state dict itself, no {generator, generator_ema} around it.
    (weights / "checkpoints" / "Reward-Forcing-T2V-1.3B").mkdir()
    torch.save(_original_state(components, 2.0), weights / "checkpoints" / "Reward-Forcing-T2V-1.3B" / "rewardforcing.pt")
    torch.save({"generator": _original_state(components, -1.0), "generator_ema": _original_state(components, 2.25)},
               weights / "checkpoints" / "rolling_forcing_dmd.pt")
    return {"self_forcing_dmd": 0.0, "self_forcing_sid": 0.25, "causvid": 0.5, "longlive": 0.75,
            "causal_forcing_chunkwise": 1.0, "causal_forcing_framewise": 1.25, "causal_forcing_framewise_2step": 1.5,
            "causal_forcing_framewise_1step": 1.75, "reward_forcing": 2.0,
            "rolling_forcing": 2.25}


def _longlive_lora(components, path: Path) -> torch.Tensor:
    """lora.pt as LongLive saves it: {'generator_lora': peft state of the original Wan names};
    returns the expected change of blocks.0's self-attention q weight (alpha = rank)."""
    q = components.generator.blocks[0].attn1.to_q
    down, up = torch.randn(4, q.in_features) * 0.1, torch.randn(q.out_features, 4) * 0.1
    torch.save({"generator_lora": {"base_model.model.blocks.0.self_attn.q.lora_A.weight": down,
                                   "base_model.model.blocks.0.self_attn.q.lora_B.weight": up}}, path)
    return up @ down


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory, tiny_components):
    folder = tmp_path_factory.mktemp("registry")
    weights = folder / "weights"
    offsets = _write_checkpoints(tiny_components, weights)
    delta = _longlive_lora(tiny_components, weights / "longlive_models" / "models" / "lora.pt")
    return load_registry(_tiny_registry(folder)), weights, offsets, delta


def test_every_checkpoint_layout_loads_its_own_weights(tiny_weights, tiny_components):
    registry, weights, offsets, delta = tiny_weights
    base = tiny_components.generator.state_dict()
    for key, model in registry.items():
        assert not model.missing(weights), key
        loaded = load_components(model.config, weights).generator.state_dict()
        q = "blocks.0.attn1.to_q.weight"
        for name in (q, "proj_out.weight", "blocks.1.ffn.net.2.weight"):
            expected = base[name] + offsets[key] + (delta if key == "longlive" and name == q else 0)
            torch.testing.assert_close(loaded[name], expected, rtol=0, atol=1e-6, msg=f"{key} {name}")


def test_each_model_generates_with_its_own_block_size_and_window(tiny_weights):
    registry, weights, _, _ = tiny_weights
    for key in ("causvid", "longlive", "causal_forcing_framewise_1step"):
        config = registry[key].config
        pipeline = StreamingVideoPipeline(load_components(config, weights), config)
        results = list(pipeline.generate(GenerationRequest("a lighthouse", seed=1, num_blocks=3)))
        complete = [r for r in results if r.complete]
        assert [r.latents.shape[2] for r in complete] == [config.frames_per_block] * 3
        assert complete[-1].window_frames == (None if key != "longlive" else 12)
        # Video frames per result: a frame-wise model's first block is the one first frame, then 4 per block.
        expected = [1, 4, 4] if config.frames_per_block == 1 else [1, 4 * config.frames_per_block - 4] + \
            [4 * config.frames_per_block] * 2
        assert [len(r.frames) for r in results] == expected, key


def test_missing_files_name_the_file_and_the_download(tiny_weights, tmp_path, tiny_components):
    registry, _, _, _ = tiny_weights
    write_original_layout(tiny_components, tmp_path)
    longlive = registry["longlive"]
    assert longlive.missing(tmp_path) == ["longlive_models/models/longlive_base.pt", "longlive_models/models/lora.pt"]
    with pytest.raises(WeightsError, match="longlive_base.pt.*Efficient-Large-Model/LongLive"):
        load_components(longlive.config, tmp_path)
    (tmp_path / "longlive_models" / "models").mkdir(parents=True)
    torch.save({"generator": _original_state(tiny_components, 0.0)},
               tmp_path / "longlive_models" / "models" / "longlive_base.pt")
    torch.save({"generator_lora": {"unrelated.weight": torch.zeros(2)}}, tmp_path / "longlive_models/models/lora.pt")
    with pytest.raises(WeightsError, match="lora.pt is not a LoRA for this Wan generator"):
        load_components(longlive.config, tmp_path)


def test_models_command_says_what_is_present_and_what_to_download(tiny_weights, tmp_path, capsys):
    _, weights, _, _ = tiny_weights
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "self_forcing_sid.pt").write_bytes(b"")
    assert models_main(["--weights", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "longlive: LongLive-1.3B" in out and "rolling window of 12 latent frames (3 sink)" in out
    assert "positions within the window, the sink a running average of evicted frames (0.999)" in out
    assert "missing: wan_models/Wan2.1-T2V-1.3B/" in out and "hf download tianweiy/CausVid" in out
    assert "get it: hf download Wan-AI/Wan2.1-T2V-1.3B --local-dir <weights>/wan_models/Wan2.1-T2V-1.3B" in out
    assert "GPU memory: high 24.2 GiB" in out
    assert models_main(["--weights", str(weights)]) == 0
    assert capsys.readouterr().out.count("present in the weights folder") == 10


def test_app_switches_models_one_resident_at_a_time(tiny_weights):
    from demo.runtime import load_runtime
    from demo.ui import models_markdown

    registry, weights, _, _ = tiny_weights
    registry_file = registry["causvid"].config_path.parent / "models.yaml"
    runtime = load_runtime(registry["self_forcing_dmd"].config_path, str(weights), "cpu", admin_token="secret",
                           registry=registry_file)
    assert [m.key for m in runtime.available_models()] == list(registry)
    assert "**loaded**" in models_markdown(runtime).splitlines()[2]  # the DMD row
    old = weakref.ref(runtime.engine.pipeline)
    with pytest.raises(PermissionError):
        runtime.switch_model("causvid", "wrong")
    assert runtime.engine.pipeline is old()
    banner = runtime.switch_model("causvid", "secret")
    gc.collect()
    assert old() is None  # the previous model is gone, not kept beside the new one
    assert "CausVid" in banner and runtime.config.name.startswith("CausVid")
    assert runtime.engine.pipeline.config.sampler.denoising_steps == [1000, 757, 522]
    frames = np.concatenate([r.frames for r in runtime.engine.pipeline.generate(GenerationRequest("x", num_blocks=1))])
    assert frames.shape[1:] == (64, 96, 3)
    with pytest.raises(ValueError, match="not a model present"):
        runtime.switch_model("wan_14b", "secret")
