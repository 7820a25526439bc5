"""Reward Forcing's checkpoint (JaydenLyh/Reward-Forcing) through the registry: a tiny checkpoint in the project's
layout loads, and generation equals an independent step-by-step implementation of the project's published rule: the
Self-Forcing loop (pipeline/causal_inference.py) over its causal self-attention cache (wan/modules/causal_model.py),
transcribed below per layer: keys stored unrotated; a rolling window of 9 latent frames whose first 3 are the sink;
on eviction the sink becomes alpha * sink + (1 - alpha) * evicted; the attended keys are the sink and the recent
frames rotated from position 0, the block's queries at the positions after them."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pipelines.branch import Branch, KeptBlock
from pipelines.core import GenerationRequest, StreamingVideoPipeline
from pipelines.steering import PromptSwitch, ScriptedSteering

from published import published_block, published_steps
from tiny_checkpoints import registered_on_tiny

PROMPT = "a red circle moves to the right on a dark blue background"


class PublishedCache:
    """Reward Forcing's per-layer cache dicts ({k, v, global_end_index, local_end_index}) and the index arithmetic of
    its CausalWanSelfAttention.forward, behind the begin/update/commit calls the model makes."""

    relative_positions = True

    def __init__(self, layers: int, frame_tokens: int, heads: int, head_dim: int, window_frames: int,
                 sink_frames: int, alpha: float | None) -> None:
        self.frame, self.size, self.sink = frame_tokens, window_frames * frame_tokens, sink_frames * frame_tokens
        self.max_attention = self.size
        self.alpha = alpha
        self.layers = [{"k": torch.zeros(1, self.size, heads, head_dim), "v": torch.zeros(1, self.size, heads, head_dim),
                        "global_end": 0, "local_end": 0} for _ in range(layers)]
        self.key_rope = None

    def begin(self, start_token: int, num_tokens: int) -> None:
        self.current = (start_token, num_tokens)

    def _plan(self, layer: dict) -> tuple[int, int]:
        """(tokens evicted, local_end_index after this write), as their forward computes them."""
        start, new = self.current
        end = start + new
        if end > layer["global_end"] and new + layer["local_end"] > self.size:
            evicted = new + layer["local_end"] - self.size
            return evicted, layer["local_end"] + end - layer["global_end"] - evicted
        return 0, layer["local_end"] + end - layer["global_end"]

    def window_frames(self) -> tuple[int, int]:
        """(frames of the attended keys, the query's start frame): sink + [kv_start, local_end), and their
        query_start_frame = (sink + (local_end - kv_start) - q_len) // frame."""
        _, local_end = self._plan(self.layers[0])
        kv_start = max(self.sink, local_end - self.max_attention + self.sink)
        keys = self.sink + local_end - kv_start
        return keys // self.frame, (keys - self.current[1]) // self.frame

    def update(self, index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[index]
        evicted, local_end = self._plan(layer)
        new = self.current[1]
        if evicted:
            old_k = layer["k"][:, self.sink:self.sink + evicted].clone()
            old_v = layer["v"][:, self.sink:self.sink + evicted].clone()
            rolled = layer["local_end"] - evicted - self.sink
            for name in ("k", "v"):
                layer[name][:, self.sink:self.sink + rolled] = \
                    layer[name][:, self.sink + evicted:self.sink + evicted + rolled].clone()
        layer["k"][:, local_end - new:local_end] = k
        layer["v"][:, local_end - new:local_end] = v
        if evicted and self.alpha is not None:
            if evicted == self.sink:
                layer["k"][:, :self.sink] = self.alpha * layer["k"][:, :self.sink] + (1 - self.alpha) * old_k
                layer["v"][:, :self.sink] = self.alpha * layer["v"][:, :self.sink] + (1 - self.alpha) * old_v
            else:
                layer["k"][:, :min(evicted, self.sink)] = old_k[:, :self.sink]
                layer["v"][:, :min(evicted, self.sink)] = old_v[:, :self.sink]
        kv_start = max(self.sink, local_end - self.max_attention + self.sink)
        keys = torch.cat([layer["k"][:, :self.sink], layer["k"][:, kv_start:local_end]], dim=1)
        values = torch.cat([layer["v"][:, :self.sink], layer["v"][:, kv_start:local_end]], dim=1)
        layer["global_end"], layer["local_end"] = sum(self.current), local_end
        return self._rotated(keys), values

    def _rotated(self, keys: torch.Tensor) -> torch.Tensor:
        """Their causal_rope_apply from frame 0: complex multiplication in float64."""
        cos, sin = self.key_rope
        pairs = torch.view_as_complex(keys.double().unflatten(-1, (-1, 2)).contiguous())
        return torch.view_as_real(pairs * torch.complex(cos.double(), sin.double())).flatten(-2).type_as(keys)

    def commit(self, start_token: int, num_tokens: int) -> None:
        pass


def published_inference(pipeline: StreamingVideoPipeline, prompt: str, seed: int, num_blocks: int,
                        alpha: float | None) -> list[torch.Tensor]:
    """Their CausalInferencePipeline.inference: 4 warped steps per 3-frame block, x0 re-noised with fresh noise,
    the clean block run once more at timestep 0 (context_noise) to fill the cache."""
    model, fpb = pipeline.generator, 3
    h, w = 64 // 8, 96 // 8
    context = model.encode_context(pipeline.prompt_encoder.encode(prompt))
    cache = PublishedCache(model.config.num_layers, model.frame_tokens(h, w), model.config.num_heads, model.head_dim,
                           9, 3, alpha)
    rng = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, num_blocks * fpb, 16, h, w), generator=rng).permute(0, 2, 1, 3, 4)
    steps = published_steps([1000, 750, 500, 250])
    outputs = []
    for block in range(num_blocks):
        start = block * fpb
        clean = published_block(lambda noisy, t: model(noisy, torch.full((1, fpb), t), context, start_frame=start,
                                                       kv_cache=cache), noise[:, :, start:start + fpb], steps, rng)
        outputs.append(clean)
        model(clean, torch.zeros((1, fpb)), context, start_frame=start, kv_cache=cache)
    return outputs


@pytest.fixture(scope="module")
def reward_forcing(tmp_path_factory, tiny_components) -> StreamingVideoPipeline:
    """The registry's entry on the tiny architecture, its checkpoint written as the project saves it: the generator
    wrapper's state dict itself, original Wan names under 'model.'."""
    return registered_on_tiny(tiny_components, tmp_path_factory.mktemp("reward_forcing"), "reward_forcing",
                              lambda state: state)


def latents_of(pipeline: StreamingVideoPipeline, request: GenerationRequest) -> list[torch.Tensor]:
    return [r.latents for r in pipeline.generate(request) if r.complete]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for index, (a, b) in enumerate(zip(got, want)):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), f"block {index}: {(a - b).abs().max()}"


def test_generation_follows_the_published_rule(reward_forcing):
    # 6 blocks of 3 frames through a 9-frame window: the window evicts before blocks 3, 4 and 5.
    assert_close(latents_of(reward_forcing, GenerationRequest(PROMPT, seed=5, num_blocks=6)),
                 published_inference(reward_forcing, PROMPT, 5, 6, alpha=0.999))


def test_the_running_average_sink_and_the_window_positions_are_what_changes(reward_forcing):
    strong = dataclasses.replace(reward_forcing.config, sink_momentum=0.5)
    pipeline = StreamingVideoPipeline(reward_forcing.components, strong)
    got = latents_of(pipeline, GenerationRequest(PROMPT, seed=2, num_blocks=6))
    assert_close(got, published_inference(pipeline, PROMPT, 2, 6, alpha=0.5))
    # Control: a sink that stays the first frames is another video from the first eviction (block 3) on.
    fixed_sink = published_inference(pipeline, PROMPT, 2, 6, alpha=None)
    assert all(torch.allclose(a, b, atol=2e-5) for a, b in zip(got[:3], fixed_sink[:3]))
    assert not torch.allclose(got[3], fixed_sink[3], atol=1e-3)
    # Control: the same window with absolute positions (Self-Forcing's rolling cache) agrees until the window
    # rolls (slots and frames coincide), then differs.
    absolute = dataclasses.replace(strong, relative_positions=False, sink_momentum=None)
    rolling = latents_of(StreamingVideoPipeline(reward_forcing.components, absolute),
                         GenerationRequest(PROMPT, seed=2, num_blocks=6))
    assert all(torch.allclose(a, b, atol=2e-5) for a, b in zip(got[:3], rolling[:3]))
    assert not torch.allclose(got[4], rolling[4], atol=1e-3)


def test_a_branch_after_the_window_rolled_equals_the_fresh_run(reward_forcing):
    """The kept blocks' cache writes replay in order, so the running-average sink is rebuilt exactly."""
    base = GenerationRequest(PROMPT, seed=9, num_blocks=6)
    original = [r for r in reward_forcing.generate(base) if r.complete]
    second = "a green square moves up on a black background"
    kept = tuple(KeptBlock(r.prompt, r.switch_mode, r.reseed, r.latents, r.rng_state) for r in original[:5])
    branched = latents_of(reward_forcing, Branch(kept, prompt=second, mode="soft").request(base))
    fresh = latents_of(reward_forcing, GenerationRequest(PROMPT, seed=9, num_blocks=6,
                                                         steering=ScriptedSteering({5: PromptSwitch(second, "soft")})))
    assert all(torch.equal(a, b) for a, b in zip(branched, fresh))
    assert not torch.allclose(branched[5], original[5].latents, atol=1e-3)
