"""Branching: a branch from block k keeps the frames before k and equals the fresh run that changed its prompt (or
seed) at block k; branches of one run, and branches of branches, stay independent."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.branch import Branch, KeptBlock, ResumeFrom
from pipelines.core import GenerationRequest, RequestError
from pipelines.steering import PromptSwitch, ScriptedSteering

FIRST = "a red circle moves to the right on a dark blue background"
SECOND = "a green square moves up on a black background"
THIRD = "a yellow triangle moves down on a dark green background"


def run(pipeline, request, cancel_after: int | None = None) -> list:
    """The complete BlockResults of a run (a continuous one cancelled after `cancel_after` blocks)."""
    results = []
    for result in pipeline.generate(request, cancel=lambda: cancel_after is not None and len(results) >= cancel_after):
        if result.complete:
            results.append(result)
    return results


def frames_of(pipeline, request, cancel_after: int | None = None) -> list[np.ndarray]:
    frames = []
    blocks = 0
    for result in pipeline.generate(request, cancel=lambda: cancel_after is not None and blocks >= cancel_after):
        frames.append(result.frames)
        blocks += result.complete
    return frames


def kept(results, upto: int) -> tuple[KeptBlock, ...]:
    """What a front end keeps of the first `upto` blocks of a run."""
    return tuple(KeptBlock(r.prompt, r.switch_mode, r.reseed, r.latents, r.rng_state) for r in results[:upto])


def same_latents(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x.latents, y.latents) for x, y in zip(a, b))


def test_a_branch_keeps_the_blocks_before_it_and_equals_a_fresh_run_that_switched_there(tiny_pipeline):
    base = GenerationRequest(FIRST, seed=11, num_blocks=4)
    original = run(tiny_pipeline, base)
    branch = Branch(kept(original, 2), prompt=SECOND, mode="recache")
    branched = list(tiny_pipeline.generate(branch.request(base)))
    complete = [r for r in branched if r.complete]
    assert [r.restored for r in complete] == [True, True, False, False]
    assert [r.prompt for r in complete] == [FIRST, FIRST, SECOND, SECOND]
    fresh = run(tiny_pipeline, GenerationRequest(FIRST, seed=11, num_blocks=4,
                                                 steering=ScriptedSteering({2: PromptSwitch(SECOND, "recache")})))
    assert same_latents(complete, fresh)
    # The kept blocks decode to the original's frames (first frame, rest of block 0, block 1).
    assert all(np.array_equal(a, b) for a, b in zip(frames_of(tiny_pipeline, base)[:3], [r.frames for r in branched[:3]]))
    # Control: the branch's own blocks are not the original's.
    assert not torch.equal(complete[2].latents, original[2].latents)
    # Without a new prompt or seed, a branch is the original run again.
    assert same_latents(run(tiny_pipeline, Branch(kept(original, 3)).request(base)), original)


def test_a_new_seed_from_a_block_equals_the_fresh_run_with_that_reseed(tiny_pipeline):
    base = GenerationRequest(FIRST, seed=3, num_blocks=4)
    original = run(tiny_pipeline, base)
    branched = run(tiny_pipeline, Branch(kept(original, 1), seed=99).request(base))
    fresh = run(tiny_pipeline, GenerationRequest(FIRST, seed=3, num_blocks=4, reseeds={1: 99}))
    assert same_latents(branched, fresh) and branched[1].reseed == 99
    assert torch.equal(branched[0].latents, original[0].latents)
    assert not torch.equal(branched[1].latents, original[1].latents)


def test_branches_of_one_run_and_of_a_branch_are_independent(tiny_pipeline):
    base = GenerationRequest(FIRST, seed=5, num_blocks=5)
    original = run(tiny_pipeline, base)
    first = run(tiny_pipeline, Branch(kept(original, 1), prompt=SECOND, mode="plain").request(base))
    second = run(tiny_pipeline, Branch(kept(original, 3), prompt=THIRD, seed=7).request(base))
    again = run(tiny_pipeline, Branch(kept(original, 1), prompt=SECOND, mode="plain").request(base))
    assert same_latents(first, again)  # (the second branch changed nothing the first depends on)
    # A branch of the first branch (its own switch at 1, a new one at 3) equals the fresh run with both.
    nested = run(tiny_pipeline, Branch(kept(first, 3), prompt=THIRD, seed=8).request(base))
    fresh = run(tiny_pipeline, GenerationRequest(FIRST, seed=5, num_blocks=5, reseeds={3: 8}, steering=ScriptedSteering(
        {1: PromptSwitch(SECOND, "plain"), 3: PromptSwitch(THIRD, "recache")})))
    assert same_latents(nested, fresh)
    assert same_latents(second, run(tiny_pipeline, GenerationRequest(FIRST, seed=5, num_blocks=5, reseeds={3: 7},
                                                                     steering=ScriptedSteering({3: PromptSwitch(THIRD)}))))
    assert not torch.equal(nested[4].latents, second[4].latents)


def test_image_to_video_and_rolling_window_branches(tiny_pipeline):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    base = GenerationRequest(FIRST, seed=2, num_blocks=3, image=image)
    original = run(tiny_pipeline, base)
    branched = run(tiny_pipeline, Branch(kept(original, 2), prompt=SECOND).request(base))
    fresh = run(tiny_pipeline, GenerationRequest(FIRST, seed=2, num_blocks=3, image=image,
                                                 steering=ScriptedSteering({2: PromptSwitch(SECOND)})))
    assert same_latents(branched, fresh)
    # Continuous (rolling window, noise drawn block by block): a branch at block 6 after the window rolled.
    endless = GenerationRequest(FIRST, seed=4, continuous=True)
    original = run(tiny_pipeline, endless, cancel_after=8)
    assert original[-1].window_frames is not None
    branched = run(tiny_pipeline, Branch(kept(original, 6), prompt=SECOND).request(endless), cancel_after=8)
    fresh = run(tiny_pipeline, GenerationRequest(FIRST, seed=4, continuous=True,
                                                 steering=ScriptedSteering({6: PromptSwitch(SECOND)})), cancel_after=8)
    assert same_latents(branched, fresh) and same_latents(branched[:6], original[:6])
    assert not torch.equal(branched[6].latents, original[6].latents)


def test_a_branch_that_cannot_be_restored_is_refused(tiny_pipeline):
    base = GenerationRequest(FIRST, seed=1, num_blocks=3)
    original = run(tiny_pipeline, base)
    with pytest.raises(RequestError, match="start at a block of the run"):
        tiny_pipeline.validate(Branch(kept(original, 3), prompt=SECOND).request(base))
    with pytest.raises(RequestError, match="random state"):
        tiny_pipeline.validate(GenerationRequest(FIRST, num_blocks=3, resume=ResumeFrom(
            1, (original[0].latents,), None)))
    with pytest.raises(RequestError, match="do not fit this request"):
        list(tiny_pipeline.generate(Branch(kept(original, 1), prompt=SECOND).request(
            GenerationRequest(FIRST, seed=1, num_blocks=3, height=80, width=128))))
