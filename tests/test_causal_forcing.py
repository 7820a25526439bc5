"""Causal Forcing's checkpoints (thu-ml/Causal-Forcing) through the registry: a tiny checkpoint written in the
project's layout loads, and generation equals an independent step-by-step implementation of the project's published
inference rule (CausalInferencePipeline.inference): blocks of one latent frame, each denoised with the warped step
list, the first generated block with its own list (denoising_step_list_first_chunk), x0 re-noised with fresh noise,
the clean block written into the cache at timestep 0; image-to-video puts the image's latent first as a clean frame."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from pipelines.config import CONFIG_DIR
from pipelines.core import GenerationRequest, StreamingVideoPipeline
from pipelines.loading.weights import load_components
from pipelines.model.kv_cache import AttentionWindow, block_causal_mask
from pipelines.registry import load_registry

from published import published_block, published_steps
from tiny_checkpoints import dit_key_to_original, write_original_layout

TINY = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
KEYS = ("causal_forcing_chunkwise", "causal_forcing_framewise", "causal_forcing_framewise_2step",
        "causal_forcing_framewise_1step")


def published_inference(pipeline: StreamingVideoPipeline, prompt: str, seed: int, num_blocks: int,
                        steps: list[int], first_steps: list[int] | None, frames_per_block: int,
                        initial_latent: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Causal Forcing's loop with full-sequence forwards (every past frame clean at t=0, the current block noisy,
    masked block-causally) instead of a KV cache: the clean latents of each generated block."""
    model = pipeline.generator
    h, w = TINY["height"] // 8, TINY["width"] // 8
    context = model.encode_context(pipeline.prompt_encoder.encode(prompt))
    rng = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, num_blocks * frames_per_block, 16, h, w), generator=rng).permute(0, 2, 1, 3, 4)
    tokens = model.frame_tokens(h, w)
    past = [] if initial_latent is None else [initial_latent]
    prefix = 0 if initial_latent is None else initial_latent.shape[2]
    outputs = []
    for block in range(num_blocks):
        listed = published_steps(first_steps if block == 0 and first_steps else steps)
        noisy = noise[:, :, block * frames_per_block:(block + 1) * frames_per_block]
        done = prefix + block * frames_per_block
        mask = block_causal_mask(([prefix] if prefix else []) + [frames_per_block] * (block + 1), tokens,
                                 AttentionWindow())

        def flow_at(noisy: torch.Tensor, t: float) -> torch.Tensor:
            times = torch.tensor([[0.0] * done + [t] * frames_per_block])
            return model(torch.cat(past + [noisy], dim=2), times, context, attn_mask=mask)[:, :, done:]

        clean = published_block(flow_at, noisy, listed, rng)
        past.append(clean)
        outputs.append(clean)
    return outputs


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_components):
    """The four Causal Forcing entries on the tiny architecture, with tiny checkpoints in the project's layout:
    {'generator', 'generator_ema'}, original Wan names under 'model.' (FSDP's wrapper kept in one file)."""
    folder = tmp_path_factory.mktemp("causal_forcing")
    weights = folder / "weights"
    write_original_layout(tiny_components, weights)
    state = {"model." + dit_key_to_original(k): v.detach().clone()
             for k, v in tiny_components.generator.state_dict().items()}
    entries = {}
    for key, model in load_registry().items():
        if key not in KEYS:
            continue
        path = weights / model.config.weights.generator_ckpt
        path.parent.mkdir(parents=True, exist_ok=True)
        ema = {k.replace("model.", "model._fsdp_wrapped_module.", 1): v for k, v in state.items()} \
            if key == "causal_forcing_framewise" else state
        torch.save({"generator": state, "generator_ema": ema}, path)
        config = folder / f"{key}.yaml"
        config.write_text(yaml.safe_dump({"base": str(model.config_path), "model": TINY["model"], "vae": TINY["vae"],
                                          "text_encoder": TINY["text_encoder"], "dtype": "float32", "height": 64,
                                          "width": 96, "resolutions": ["96x64"]}))
        entries[key] = {"config": config.name, "code": model.code}
    (folder / "models.yaml").write_text(yaml.safe_dump({"models": entries}))
    return load_registry(folder / "models.yaml"), weights


def _pipeline(registry, key: str) -> StreamingVideoPipeline:
    models, weights = registry
    config = models[key].config
    assert not models[key].missing(weights)
    return StreamingVideoPipeline(load_components(config, weights), config)


@pytest.mark.parametrize("key", KEYS)
def test_generation_follows_the_published_inference_rule(registry, key):
    pipeline = _pipeline(registry, key)
    cfg = pipeline.config
    blocks = 4 if cfg.frames_per_block == 1 else 2
    got = [r.latents for r in pipeline.generate(GenerationRequest("a red fox", seed=7, num_blocks=blocks)) if r.complete]
    want = published_inference(pipeline, "a red fox", 7, blocks, cfg.sampler.denoising_steps,
                               cfg.sampler.first_block_steps, cfg.frames_per_block)
    assert len(got) == blocks
    for index, (a, b) in enumerate(zip(got, want)):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), f"{key} block {index}: {(a - b).abs().max()}"


def test_the_first_block_list_matters_and_image_to_video_follows_the_rule(registry):
    pipeline = _pipeline(registry, "causal_forcing_framewise_1step")
    got = [r.latents for r in pipeline.generate(GenerationRequest("a red fox", seed=7, num_blocks=3)) if r.complete]
    # Control: the same rule without the first block's own list is another video.
    plain = published_inference(pipeline, "a red fox", 7, 3, [1000], None, 1)
    assert not torch.allclose(got[0], plain[0], atol=1e-3)
    # Image-to-video (their --i2v): the image's latent is a clean first frame, 1-frame blocks follow.
    image_latent = torch.randn(1, 16, 1, 8, 12, generator=torch.Generator().manual_seed(1))
    got = [r.latents for r in pipeline.generate(GenerationRequest("a red fox", seed=3, num_blocks=3,
                                                                  reference_latent=image_latent)) if r.complete]
    want = published_inference(pipeline, "a red fox", 3, 3, [1000], [1000, 750, 500, 250], 1, image_latent)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), (a - b).abs().max()


def test_the_frame_wise_registry_entry_streams_one_frame_then_four(registry):
    pipeline = _pipeline(registry, "causal_forcing_framewise_2step")
    results = list(pipeline.generate(GenerationRequest("a red fox", seed=1, num_blocks=3)))
    assert [len(r.frames) for r in results] == [1, 4, 4] and all(r.complete for r in results)
    assert Path(pipeline.components.model_dir).name == "weights"
