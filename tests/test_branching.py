"""Branching: a branch from block k keeps the frames before k and equals the fresh run that changed its prompt (or
seed) at block k; branches of one run, and branches of branches, stay independent."""
from __future__ import annotations

import gradio as gr
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


# -- the app: a visitor's run tree, the branch and rewind endpoints, the cap on kept blocks

def _t2v(handlers, session, prompt=FIRST, seed=3, blocks=4):
    return list(handlers.text_to_video(prompt, "", seed, False, blocks, 16, "96x64", False, "", None, 1.0, False,
                                       False, 0.0, session, None))


def test_the_app_branches_and_rewinds_a_visitors_runs(tiny_pipeline, tiny_config, tmp_path):
    from demo.handlers import Handlers
    from pipelines.loading.media import read_video
    from pipelines.run_record import read_record

    from runtimes import local_runtime

    runtime = local_runtime(tiny_config, tiny_pipeline)
    handlers, session, other = Handlers(runtime), runtime.new_session(), runtime.new_session()
    first = _t2v(handlers, session)
    assert first[-1][2].startswith("Done.") and first[-1][7] == 1  # (the run number)
    branched = list(handlers.branch(1, 3, SECOND, "recache", False, None, 16, session, None))
    assert branched[-1][2].startswith("Done.") and "branch from block 3" in branched[-1][2]
    assert any("kept block 2 restored" in update[2] for update in branched)
    record = read_record(session.output_dir / "run002" / "run.json")
    assert record["branch_block"] == 2 and [b["prompt"] for b in record["blocks"]] == [FIRST, FIRST, SECOND, SECOND]
    video, parent = read_video(branched[-1][3]), read_video(first[-1][3])
    assert len(video) == len(parent)
    # The branch's record replays to the same video, made from scratch.
    replayed = list(handlers.replay_run(str(session.output_dir / "run002" / "run.json"), 16, session, None))
    assert np.array_equal(np.stack(read_video(replayed[-1][3])), np.stack(video))
    # Rewind run 2 to its block 4: the same prompts, new noise there; a branch of a branch.
    rewound = list(handlers.rewind(2, 4, 77, 16, session, None))
    record = read_record(session.output_dir / "run004" / "run.json")
    assert rewound[-1][2].startswith("Done.") and record["blocks"][3]["reseed"] == 77
    assert [b["prompt"] for b in record["blocks"]] == [FIRST, FIRST, SECOND, SECOND]
    tree = session.runs.markdown()
    assert "- run 1: " in tree and "\n  - run 2 ← run 1 at block 3" in tree and "\n    - run 4 ← run 2 at block 4" in tree
    # Refusals say what is possible; another visitor cannot branch this one's runs.
    for args, message in (((9, 2), "no run 9"), ((1, 1), "from block 2 or later"), ((1, 5), "has 4 blocks")):
        with pytest.raises(gr.Error, match=message):
            list(handlers.branch(*args, SECOND, "recache", False, None, 16, session, None))
    with pytest.raises(gr.Error, match="no run 1"):
        list(handlers.branch(1, 2, SECOND, "recache", False, None, 16, other, None))
    assert _t2v(handlers, session, blocks=1)[-1][2].startswith("Done.")  # (the server goes on serving)


def test_kept_blocks_stay_within_the_visitors_cap_and_say_what_was_dropped(tiny_pipeline, tiny_config):
    from demo.handlers import Handlers
    from demo.session import SessionControl

    from runtimes import local_runtime

    handlers = Handlers(local_runtime(tiny_config, tiny_pipeline))
    probe = SessionControl()
    _t2v(handlers, probe, blocks=1)
    block_mb = probe.runs.runs[1].kept_bytes / 2**20
    session = SessionControl(branch_memory_mb=2.5 * block_mb)
    first = _t2v(handlers, session)
    assert "blocks after 2 of this run cannot be branched from" in first[-1][2]
    with pytest.raises(gr.Error, match="Block 4 of run 1 can no longer be branched from.*Branch from block 3 or earlier"):
        list(handlers.branch(1, 4, SECOND, "recache", False, None, 16, session, None))
    assert list(handlers.branch(1, 3, SECOND, "recache", False, None, 16, session, None))[-1][2].startswith("Done.")
    assert "run 1, run 2 can no longer be branched" in _t2v(handlers, session, seed=4)[-1][2]
    with pytest.raises(gr.Error, match="Branch from a newer run"):
        list(handlers.branch(1, 2, SECOND, "recache", False, None, 16, session, None))
    assert sum(run.kept_bytes for run in session.runs.runs.values()) <= session.runs.cap_bytes
