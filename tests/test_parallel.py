"""One stream over several ranks (--gpus, pipelines/parallel/): on the CPU, processes over gloo on the tiny model
make the latents of one process, block by block, for both parts: the generator's passes split by sequence
(Ulysses), and decoding on a rank of its own."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipelines.builder import build_pipeline
from pipelines.core import GenerationRequest, RequestError, StreamingVideoPipeline
from pipelines.loading.lora import LoraChoice
from pipelines.loading.weights import WeightsError
from pipelines.parallel.layout import ParallelError, ParallelLayout
from pipelines.pose.animation import make_pose_animator
from pipelines.steering import PromptSteering, PromptSwitch, ScriptedSteering
from serving.engine import Engine
from serving.jobs import Block, Finished, StreamJob

CONTINUOUS_BLOCKS = 5  # past the continuous window of 9 latent frames: the rolling cache evicts


@pytest.fixture(scope="module")
def config(tiny_config):
    return dataclasses.replace(tiny_config, continuous_window=[9, 3])


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, config):
    """A rank-4 LoRA on every self-attention query of the tiny model (seeded)."""
    rng = torch.Generator().manual_seed(5)
    dim = config.model["dim"]
    state = {}
    for layer in range(config.model["num_layers"]):
        state[f"blocks.{layer}.attn1.to_q.lora_A.weight"] = torch.randn(4, dim, generator=rng) * 0.1
        state[f"blocks.{layer}.attn1.to_q.lora_B.weight"] = torch.randn(dim, 4, generator=rng) * 0.1
    path = tmp_path_factory.mktemp("lora") / "shift.safetensors"
    save_file(state, str(path))
    return str(path)


def requests(lora: str) -> dict[str, GenerationRequest]:
    """Text-to-video with a prompt switch (the cache rebuilt) and a LoRA, image-to-video, a continuous run past
    its rolling window."""
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    switch = ScriptedSteering({2: PromptSwitch("a green square moves up on a dark red background", "recache")})
    return {
        "t2v": GenerationRequest("a red circle moves to the right on a dark blue background", seed=4, num_blocks=4,
                                 steering=switch, loras=(LoraChoice(lora, 0.8),)),
        "i2v": GenerationRequest("a yellow triangle moves down", seed=7, num_blocks=3, image=image),
        "continuous": GenerationRequest("a blue circle moves left on a dark green background", seed=9,
                                        continuous=True),
    }


def pose_request(pipeline: StreamingVideoPipeline) -> GenerationRequest:
    frames = list(np.random.default_rng(8).integers(0, 255, (13, 64, 96, 3), dtype=np.uint8))
    reference = Image.fromarray(np.full((64, 96, 3), 90, dtype=np.uint8))
    return make_pose_animator(pipeline, None).request(reference, frames, True, GenerationRequest("a figure dances",
                                                                                                seed=2))


def run(pipeline: StreamingVideoPipeline, request: GenerationRequest) -> list:
    """(complete block latents, the run's frames) of a request; a continuous one stops after CONTINUOUS_BLOCKS."""
    latents, frames = [], []
    for result in pipeline.generate(request):
        frames.append(result.frames)
        if result.complete:
            latents.append(result.latents)
        if len(latents) == CONTINUOUS_BLOCKS:
            break  # (as the app stops: the stream closes; its run stops after the block under way)
    return latents, np.concatenate(frames)


@pytest.fixture(scope="module")
def single(config, lora_file):
    pipeline, _ = build_pipeline(config, None, "cpu")
    runs = {name: run(pipeline, request) for name, request in requests(lora_file).items()}
    runs["pose"] = run(pipeline, pose_request(pipeline))
    return runs


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_an_uneven_token_split_and_a_decoding_rank_together(config, lora_file):
    """Three processes: two split each pass of an 80x112 video (35 tokens per frame: 18 + 17), one decodes."""
    def request() -> GenerationRequest:
        return GenerationRequest("a red circle moves to the right on a dark blue background", seed=6, num_blocks=3,
                                 height=80, width=112, loras=(LoraChoice(lora_file, 1.0),))

    one, _ = build_pipeline(config, None, "cpu")
    want_latents, want_frames = run(one, request())
    pipeline, _ = build_pipeline(config, None, "cpu", gpus=3, split="both")
    try:
        assert pipeline.generator.sequence_shard.split_sizes(35) == [18, 17]
        got_latents, got_frames = run(pipeline, request())
        stopped = run(pipeline, GenerationRequest("a blue square", seed=1, num_blocks=4, continuous=True))
    finally:
        pipeline.parallel.close()
    errors = [relative_error(got, want) for got, want in zip(got_latents, want_latents)]
    assert len(got_latents) == 3 and max(errors) <= 1e-5, errors
    assert got_frames.shape == want_frames.shape and np.abs(got_frames.astype(int) - want_frames).max() <= 1
    assert len(stopped[0]) == CONTINUOUS_BLOCKS


def test_a_split_that_differs_from_one_rank_is_caught(config, lora_file, single, monkeypatch):
    """Control: with the all-to-all's inverse permuting heads wrongly, the split latents differ."""
    from pipelines.parallel.sequence import SequenceShard

    exact = SequenceShard.tokens_from_heads

    def swapped(self, x, frames, frame_tokens):
        out = exact(self, x, frames, frame_tokens)
        return out.unflatten(-1, (self.size, -1)).flip(-2).flatten(-2)

    monkeypatch.setattr(SequenceShard, "tokens_from_heads", swapped)
    pipeline, _ = build_pipeline(config, None, "cpu", gpus=2, split="sequence")
    try:
        got, _ = run(pipeline, requests(lora_file)["i2v"])
    finally:
        pipeline.parallel.close()
    want, _ = single["i2v"]
    assert relative_error(got[-1], want[-1]) > 1e-2


@pytest.mark.parametrize("mode", ["sequence", "decode"])
def test_a_rank_that_dies_mid_run_is_said_and_later_runs_are_refused(config, mode):
    """A helper killed during a run: the visitor is told (one message, not a hang), a new request is refused with
    the same message, and the app's process takes the group down."""
    import os
    import signal

    pipeline, _ = build_pipeline(config, None, "cpu", gpus=2, split=mode)
    try:
        with pytest.raises(RequestError, match="of GPU 1 of this split stream stopped"):
            for result in pipeline.generate(GenerationRequest("a red circle moves up", continuous=True)):
                if result.complete and result.index == 1:
                    os.kill(pipeline.parallel.processes[0].pid, signal.SIGKILL)
        with pytest.raises(RequestError, match="restart the app"):
            pipeline.validate(GenerationRequest("a blue square"))
    finally:
        pipeline.parallel.close()


@pytest.fixture(scope="module", params=["sequence", "decode"])
def split(request, config):
    """Two processes over gloo: rank 0 (this one) and a spawned helper."""
    pipeline, _ = build_pipeline(config, None, "cpu", gpus=2, split=request.param)
    yield pipeline
    pipeline.parallel.close()


def test_a_stream_split_over_two_processes_makes_the_latents_of_one(split, single, lora_file):
    runs = {name: run(split, request) for name, request in requests(lora_file).items()}
    runs["pose"] = run(split, pose_request(split))
    for name, (want_latents, want_frames) in single.items():
        got_latents, got_frames = runs[name]
        assert len(got_latents) == len(want_latents), name
        errors = [relative_error(got, want) for got, want in zip(got_latents, want_latents)]
        assert max(errors) <= 1e-5, (name, errors)
        if split.parallel.layout.mode == "decode":  # the generator is untouched: the same latents exactly, and
            # the frames decoded alike on the other rank
            assert max(errors) == 0 and np.array_equal(got_frames, want_frames), name
    assert len(runs["continuous"][0]) == CONTINUOUS_BLOCKS


def test_the_app_backend_streams_a_split_run_and_stop_ends_it_within_a_block(split, config):
    """The app's engine over the split pipeline: each block encoded for the browser; after Stop at most the block
    under way still arrives (with a decoding rank the core runs one block ahead of the stream), then the run ends."""
    engine = Engine(config, "cpu", pipeline=split)
    assert "· **2 GPUs:** " in engine.banner()
    stop_after, blocks, stopped = 2, 0, False
    events = []
    for event in engine.run(StreamJob(prompt="a red circle moves up", continuous=True), lambda: stopped,
                            PromptSteering()):
        events.append(event)
        if isinstance(event, Block) and event.complete:
            blocks += 1
            assert event.segment and event.preview
            stopped = stopped or blocks == stop_after
    assert isinstance(events[-1], Finished) and stop_after <= blocks <= stop_after + 1
    with pytest.raises(WeightsError, match="already runs a stream split"):  # one split stream per process
        build_pipeline(config, None, "cpu", gpus=2)


def test_layouts_and_refusals(config):
    assert (ParallelLayout(2).mode, ParallelLayout(4).mode) == ("decode", "both")
    assert (ParallelLayout(4).generator_ranks, ParallelLayout(4).decode_rank) == (3, 3)
    assert (ParallelLayout(2, "sequence").generator_ranks, ParallelLayout(2, "sequence").decode_rank) == (2, None)
    with pytest.raises(ParallelError, match="at least 3 GPUs"):
        ParallelLayout(2, "both")
    with pytest.raises(ParallelError, match="exactly 2 GPUs"):
        ParallelLayout(3, "decode")
    with pytest.raises(ParallelError, match="6 attention heads"):
        ParallelLayout(5, "sequence").check(config)
    with pytest.raises(WeightsError, match="--memory-profile high"):
        build_pipeline(config, None, "cpu", memory_profile="low", gpus=2)
