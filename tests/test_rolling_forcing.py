"""Rolling Forcing's checkpoint (TencentARC/RollingForcing) through the registry: a tiny checkpoint in the project's
layout loads, and generation equals an independent step-by-step implementation of the project's published rule,
transcribed below from pipeline/rolling_forcing_inference.py and its attention cache (wan/modules/causal_model.py):
windows of up to 5 blocks at staggered steps, the newest from its noise, each block re-noised to its next step after
a pass; after each pass the window's first block run again at timestep 0 into the cache; a 24-frame cache whose first
block stays, stored unrotated; a window pass attends to that block rotated to sit just before the recent clean
frames, to at most 21 - window - 3 recent frames and to the window; a cache pass attends to the last 21 frames.

One deliberate difference, made in both: each block's re-noising draws noise of the block's own shape (theirs draws a
whole window's worth per block and uses the block's part)."""
from __future__ import annotations

import pytest
import torch

from pipelines.core import GenerationRequest, RequestError, StreamingVideoPipeline

from published import published_steps, sigma_at
from tiny_checkpoints import registered_on_tiny

PROMPT = "a red circle moves to the right on a dark blue background"
H, W = 64 // 8, 96 // 8  # the latent grid at 96x64


def published_rope(x: torch.Tensor, start_frame: int, frames: int, height: int, width: int) -> torch.Tensor:
    """Wan's rope_params (1024 positions per axis: temporal d - 4*(d//6), spatial 2*(d//6) each) and
    causal_rope_apply: complex multiplication in float64 from `start_frame`."""
    d = x.shape[-1]

    def params(dim: int) -> torch.Tensor:
        return torch.outer(torch.arange(1024, dtype=torch.float64),
                           1.0 / torch.pow(10000, torch.arange(0, dim, 2, dtype=torch.float64) / dim))

    t, s = params(d - 4 * (d // 6)), params(2 * (d // 6))
    angles = torch.cat([t[start_frame:start_frame + frames].view(frames, 1, 1, -1).expand(frames, height, width, -1),
                        s[:height].view(1, height, 1, -1).expand(frames, height, width, -1),
                        s[:width].view(1, 1, width, -1).expand(frames, height, width, -1)], dim=-1)
    angles = angles.reshape(frames * height * width, 1, -1)
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2).type_as(x)


class PublishedCache:
    """Their per-layer {k, v, global_end_index, local_end_index} (24 frames) and CausalWanSelfAttention's arithmetic.
    Declared relative so that the model hands over unrotated keys (and rotates the queries at `window_frames()`'s
    second value: the pass's own start, as theirs does); the keys are rotated here, as they rotate them."""

    relative_positions = True

    def __init__(self, layers: int, frame: int, grid: tuple[int, int], heads: int, head_dim: int,
                 move_anchor: bool = True) -> None:
        self.frame, self.grid, self.block = frame, grid, 3 * frame
        self.size, self.max_attention = 24 * frame, 21 * frame
        self.move_anchor = move_anchor
        self.layers = [{"k": torch.zeros(1, self.size, heads, head_dim), "v": torch.zeros(1, self.size, heads, head_dim),
                        "global_end": 0, "local_end": 0} for _ in range(layers)]
        self.updating, self.key_rope = False, None

    def begin(self, start_token: int, num_tokens: int) -> None:
        self.current = (start_token, num_tokens)

    def window_frames(self) -> tuple[int, int]:
        return 1, self.current[0] // self.frame

    def rope(self, x: torch.Tensor, start_frame: int) -> torch.Tensor:
        return published_rope(x, start_frame, x.shape[1] // self.frame, *self.grid)

    def update(self, index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer, (current_start, _) = self.layers[index], self.current
        start_frame = current_start // self.frame
        roped_key = self.rope(k, start_frame)
        cache_end = current_start + self.block
        new = cache_end - layer["global_end"]
        if new > 0 and new + layer["local_end"] > self.size:
            evicted = new + layer["local_end"] - self.size
            rolled = layer["local_end"] - evicted - self.block
            for name in ("k", "v"):
                layer[name][:, self.block:self.block + rolled] = \
                    layer[name][:, self.block + evicted:self.block + evicted + rolled].clone()
            local_end = layer["local_end"] + cache_end - layer["global_end"] - evicted
            local_start = local_end - self.block
            layer["k"][:, local_start:local_end] = roped_key[:, :self.block]
        else:
            local_end = layer["local_end"] + cache_end - layer["global_end"]
            local_start = local_end - self.block
            layer["k"][:, local_start:local_end] = k[:, :self.block] if local_start == 0 else roped_key[:, :self.block]
        layer["v"][:, local_start:local_end] = v[:, :self.block]
        if new > 0:
            layer["global_end"], layer["local_end"] = cache_end, local_end
        if local_start == 0:
            return roped_key, v
        if self.updating:
            start = max(0, local_end - self.max_attention)
            keys, values = layer["k"][:, start:local_end].clone(), layer["v"][:, start:local_end]
            if start == 0:
                keys[:, :self.block] = self.rope(keys[:, :self.block], 0)
            return keys, values
        working_max = self.max_attention - k.shape[1] - self.block
        start = max(self.block, local_start - working_max)
        working_k, working_v = layer["k"][:, start:local_start], layer["v"][:, start:local_start]
        anchor_frame = start_frame - working_k.shape[1] // self.frame - 3 if self.move_anchor else 0
        anchor_k = self.rope(layer["k"][:, :self.block], anchor_frame)
        return torch.cat([anchor_k, working_k, roped_key], dim=1), torch.cat([layer["v"][:, :self.block], working_v, v],
                                                                              dim=1)

    def commit(self, start_token: int, num_tokens: int) -> None:
        pass


def published_inference(pipeline: StreamingVideoPipeline, prompt: str, seed: int, num_blocks: int,
                        move_anchor: bool = True) -> list[torch.Tensor]:
    """Their inference_rolling_forcing: the clean latents of every block."""
    model, fpb, steps = pipeline.generator, 3, published_steps([1000, 800, 600, 400, 200])
    window = len(steps)
    context = model.encode_context(pipeline.prompt_encoder.encode(prompt))
    cache = PublishedCache(model.config.num_layers, model.frame_tokens(H, W), (H // 2, W // 2), model.config.num_heads,
                           model.head_dim, move_anchor)
    rng = torch.Generator().manual_seed(seed)
    frames = num_blocks * fpb
    noise = torch.randn((1, frames, 16, H, W), generator=rng).permute(0, 2, 1, 3, 4)
    noisy_cache, output = torch.zeros_like(noise), torch.zeros_like(noise)
    shared = torch.tensor([t for t in reversed(steps) for _ in range(fpb)])[None]  # oldest block: the last step
    for index in range(num_blocks + window - 1):
        first, last = max(0, index - window + 1), min(num_blocks - 1, index)
        start, end = first * fpb, (last + 1) * fpb
        length = end - start
        if length == window * fpb or start == 0:
            latents = torch.cat([noisy_cache[:, :, start:end - fpb], noise[:, :, end - fpb:end]], dim=2)
        else:
            latents = noisy_cache[:, :, start:end]
        timesteps = shared if length == window * fpb else shared[:, -length:] if start == 0 else shared[:, :length]
        cache.updating = False
        flow = model(latents, timesteps, context, start_frame=start, kv_cache=cache)
        sigmas = torch.tensor([sigma_at(float(t)) for t in timesteps[0]], dtype=torch.float64).view(1, 1, -1, 1, 1)
        pred = (latents.double() - sigmas * flow.double()).float()
        output[:, :, start:end] = pred
        for block in range(first, last + 1):
            slot = slice((block - first) * fpb, (block - first + 1) * fpb)
            step = steps.index(float(timesteps[0, slot.start]))
            if step == window - 1:
                continue
            fresh = torch.randn((fpb, 16, H, W), generator=rng)[None].permute(0, 2, 1, 3, 4)
            sigma = sigma_at(steps[step + 1])
            noisy_cache[:, :, block * fpb:(block + 1) * fpb] = (1 - sigma) * pred[:, :, slot] + sigma * fresh
        cache.updating = True  # the window's first block again at timestep 0 (context_noise), into the cache
        model(pred[:, :, :fpb], torch.zeros((1, fpb)), context, start_frame=start, kv_cache=cache)
    return list(output.split(fpb, dim=2))


@pytest.fixture(scope="module")
def rolling_forcing(tmp_path_factory, tiny_components) -> StreamingVideoPipeline:
    """The registry's entry on the tiny architecture, its checkpoint written as the project saves it:
    {'generator', 'generator_ema'} with FSDP's wrapper left in the EMA names (their inference strips it)."""
    def checkpoint(state: dict) -> dict:
        wrapped = {k.replace("model.", "model._fsdp_wrapped_module.", 1): v for k, v in state.items()}
        return {"generator": {k: v + 1 for k, v in state.items()}, "generator_ema": wrapped}

    return registered_on_tiny(tiny_components, tmp_path_factory.mktemp("rolling_forcing"), "rolling_forcing",
                              checkpoint)


def latents_of(pipeline: StreamingVideoPipeline, request: GenerationRequest) -> list[torch.Tensor]:
    return [r.latents for r in pipeline.generate(request) if r.complete]


def test_generation_follows_the_published_rule(rolling_forcing):
    # 10 blocks: the cache rolls (24 frames), the anchor moves, and the last 4 passes have no new block.
    got = latents_of(rolling_forcing, GenerationRequest(PROMPT, seed=4, num_blocks=10))
    want = published_inference(rolling_forcing, PROMPT, 4, 10)
    assert len(got) == 10
    for index, (a, b) in enumerate(zip(got, want)):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), f"block {index}: {(a - b).abs().max()}"
    # Control: the anchor left at its own frames instead of just before the recent frames is another video once a
    # window starts past frame 6 (block 1's pass sees no recent frames, block 2's sees block 1 right after it).
    unmoved = published_inference(rolling_forcing, PROMPT, 4, 10, move_anchor=False)
    assert all(torch.allclose(a, b, atol=2e-5, rtol=1e-4) for a, b in zip(got[:2], unmoved[:2]))
    assert not torch.allclose(got[-1], unmoved[-1], atol=1e-3)


def test_one_block_leaves_per_pass_and_streams_as_it_leaves(rolling_forcing):
    passes = []
    forward = rolling_forcing.generator.forward

    def counting(latents, timesteps, *args, **kwargs):
        if kwargs.get("kv_cache") is not None and type(kwargs["kv_cache"]).__name__ == "WindowPass":
            passes.append(timesteps.shape[1] // 3)
        return forward(latents, timesteps, *args, **kwargs)

    rolling_forcing.generator.forward = counting
    try:
        results = list(rolling_forcing.generate(GenerationRequest(PROMPT, seed=1, num_blocks=7)))
    finally:
        del rolling_forcing.generator.forward
    # Passes 0-4 start blocks 0-4 (windows of 1..5 blocks; block 0 leaves after pass 4), then one block leaves per
    # pass: 7 + 5 - 1 passes in all, the last ones over the tail of the video.
    assert passes == [1, 2, 3, 4, 5, 5, 5, 4, 3, 2, 1]
    assert [r.index for r in results if r.complete] == list(range(7))
    assert [len(r.frames) for r in results][:3] == [1, 8, 12]


def test_image_to_video_and_branches_are_refused_with_a_reason(rolling_forcing):
    image = torch.zeros(1, 16, 1, H, W)
    with pytest.raises(RequestError, match="rolling window.*text-to-video only"):
        list(rolling_forcing.generate(GenerationRequest(PROMPT, reference_latent=image)))
    with pytest.raises(RequestError, match="cannot be branched"):
        list(rolling_forcing.generate(GenerationRequest(PROMPT, reseeds={2: 5})))
