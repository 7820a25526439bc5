"""On a CUDA GPU (skipped without one): a replayed run record and a branch give bit-identical latents in bf16, eager
and compiled, as they do on the CPU."""
from __future__ import annotations

import json

import pytest
import torch

from pipelines.branch import Branch, KeptBlock
from pipelines.builder import build_pipeline
from pipelines.config import load_config
from pipelines.core import GenerationRequest
from pipelines.run_record import RunRecorder, replay_request
from pipelines.steering import PromptSteering, PromptSwitch, ScriptedSteering

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FIRST = "a red circle moves to the right on a dark blue background"
SECOND = "a green square moves up on a black background"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_replay_and_branch_are_bit_identical_on_the_gpu(compiled):
    config = load_config("configs/tiny.yaml", dtype="bfloat16")
    pipeline, _ = build_pipeline(config, None, "cuda", compile_models=compiled, warm=True)
    assert pipeline.dtype == torch.bfloat16
    steering = PromptSteering()
    validated = pipeline.validate(GenerationRequest(FIRST, seed=5, num_blocks=6, steering=steering))
    recorder, first = RunRecorder(pipeline, validated), []
    for result in pipeline.generate(validated):
        recorder.add(result)
        if result.complete:
            first.append(result)
            if result.index == 1:
                steering.post(SECOND, "recache")
    record = json.loads(recorder.json())
    again = [r.latents for r in pipeline.generate(replay_request(record, pipeline)) if r.complete]
    assert len(again) == 6 and all(torch.equal(a.latents, b) for a, b in zip(first, again))

    kept = tuple(KeptBlock(r.prompt, r.switch_mode, r.reseed, r.latents, r.rng_state) for r in first[:4])
    base = GenerationRequest(FIRST, seed=5, num_blocks=6)
    branched = [r.latents for r in pipeline.generate(Branch(kept, prompt=FIRST, seed=9).request(base)) if r.complete]
    fresh = [r.latents for r in pipeline.generate(GenerationRequest(
        FIRST, seed=5, num_blocks=6, reseeds={4: 9},
        steering=ScriptedSteering({2: PromptSwitch(SECOND), 4: PromptSwitch(FIRST)}))) if r.complete]
    assert all(torch.equal(a, b) for a, b in zip(branched, fresh)) and len(branched) == 6
    assert not torch.equal(branched[4], first[4].latents)  # control: the branch made new blocks
