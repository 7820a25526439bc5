"""Run records: every run says what made its frames, and replaying the record makes the same latents."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.cli import main as cli_main
from pipelines.core import GenerationRequest
from pipelines.loading.media import read_video
from pipelines.run_record import RunRecorder, RunRecordError, read_record, replay_request
from pipelines.steering import PromptSteering

FIRST = "a red circle moves to the right on a dark blue background"
SECOND = "a green square moves up on a black background"


def _steered_run(pipeline, seed: int = 5) -> tuple[list[torch.Tensor], dict]:
    """4 blocks; a new prompt (recache) is posted while block 2 is shown, so it applies from block 3."""
    steering = PromptSteering()
    validated = pipeline.validate(GenerationRequest(FIRST, seed=seed, num_blocks=4, steering=steering))
    recorder, latents = RunRecorder(pipeline, validated), []
    for result in pipeline.generate(validated):
        recorder.add(result)
        if result.complete:
            latents.append(result.latents)
            if result.index == 1:
                steering.post(SECOND, "recache")
    return latents, json.loads(recorder.json())


def _latents(pipeline, request) -> list[torch.Tensor]:
    return [r.latents for r in pipeline.generate(request) if r.complete]


def test_a_replayed_record_makes_the_same_latents_switches_included(tiny_pipeline):
    latents, record = _steered_run(tiny_pipeline)
    assert [b["prompt"] for b in record["blocks"]] == [FIRST, FIRST, SECOND, SECOND]
    assert [b["switch"] for b in record["blocks"]] == [None, None, "recache", None]
    replayed = _latents(tiny_pipeline, replay_request(record, tiny_pipeline))
    assert all(torch.equal(a, b) for a, b in zip(latents, replayed)) and len(replayed) == 4
    # Controls: without the switch the blocks after it differ; another seed differs from the start.
    unswitched = dict(record, blocks=[dict(b, switch=None) for b in record["blocks"]])
    other = _latents(tiny_pipeline, replay_request(unswitched, tiny_pipeline))
    assert torch.equal(other[1], latents[1]) and not torch.equal(other[2], latents[2])
    reseeded = _latents(tiny_pipeline, replay_request(dict(record, seed=6), tiny_pipeline))
    assert not torch.equal(reseeded[0], latents[0])


def test_a_record_from_another_model_or_setting_is_refused_with_what_differs(tiny_pipeline):
    _, record = _steered_run(tiny_pipeline)
    with pytest.raises(RunRecordError, match="setting fp8_linears: recorded True, loaded False"):
        replay_request(dict(record, settings=dict(record["settings"], fp8_linears=True)), tiny_pipeline)
    files = [dict(record["model"]["files"][0], bytes=1)] + record["model"]["files"][1:]
    with pytest.raises(RunRecordError, match="model files: recorded"):
        replay_request(dict(record, model=dict(record["model"], files=files)), tiny_pipeline)
    with pytest.raises(RunRecordError, match="pass the same image"):
        replay_request(dict(record, image="0" * 64), tiny_pipeline)
    with pytest.raises(RunRecordError, match=r"LoRA style.safetensors \(10 bytes\): pass that file"):
        replay_request(dict(record, loras=[{"name": "style.safetensors", "bytes": 10, "strength": 1.0}]),
                       tiny_pipeline)


def test_the_cli_writes_a_record_and_replays_it(tmp_path, caplog):
    first, again = tmp_path / "first.mp4", tmp_path / "again.mp4"
    assert cli_main(["--prompt", FIRST, "--blocks", "2", "--seed", "3", "--device", "cpu", "--out", str(first)]) == 0
    record = read_record(first.with_suffix(".json"))
    assert record["seed"] == 3 and len(record["blocks"]) == 2 and record["model"]["files"]
    assert cli_main(["--replay", str(first.with_suffix(".json")), "--device", "cpu", "--out", str(again)]) == 0
    assert np.array_equal(np.stack(read_video(first)), np.stack(read_video(again)))
    other_dtype = "bfloat16" if record["model"]["dtype"] == "torch.float32" else "float32"
    assert cli_main(["--replay", str(first.with_suffix(".json")), "--device", "cpu", "--dtype", other_dtype,
                     "--out", str(tmp_path / "x.mp4")]) == 2  # (another dtype: refused with the difference)
    assert "model dtype: recorded 'torch." in caplog.text and not (tmp_path / "x.mp4").exists()
    (tmp_path / "bad.json").write_text("{}")
    assert cli_main(["--replay", str(tmp_path / "bad.json"), "--device", "cpu"]) == 2


def test_the_app_writes_the_record_beside_the_mp4(tiny_pipeline, tiny_config):
    from demo.session import SessionControl
    from demo.streaming import stream_video
    from serving.jobs import StreamJob

    from runtimes import local_runtime

    runtime, session = local_runtime(tiny_config, tiny_pipeline), SessionControl()
    final = list(stream_video(runtime, session, StreamJob(prompt=FIRST, seed=9, num_blocks=2)))[-1]
    record = read_record(session.output_dir / "run001" / "run.json")
    assert final[3].endswith("video.mp4") and record["seed"] == 9 and len(record["blocks"]) == 2
    assert record["blocks"][1]["block_ms"] > 0 and record["settings"]["device"] == "cpu"


def test_a_record_uploaded_in_the_app_replays_the_run_switch_included(tiny_pipeline, tiny_config, tmp_path):
    from demo.handlers import Handlers
    from demo.streaming import stream_video
    from serving.jobs import StreamJob

    from runtimes import local_runtime

    runtime = local_runtime(tiny_config, tiny_pipeline)
    handlers, first = Handlers(runtime), runtime.new_session()
    first.request_sent()
    updates = []
    for update in stream_video(runtime, first, StreamJob(prompt=FIRST, seed=4, num_blocks=4)):
        updates.append(update)
        if sum(isinstance(u[0], str) for u in updates) == 2:  # the second block is on screen: steer
            assert handlers.steer(SECOND, "recache", first).startswith("New prompt")
    first.request_done()
    original = first.output_dir / "run001"
    assert SECOND in updates[-1][6]  # (the switch happened)
    again = runtime.new_session()
    final = list(handlers.replay_run(str(original / "run.json"), 16, again, None))[-1]
    assert final[2].startswith("Done.") and SECOND in final[6], final[2]
    assert np.array_equal(np.stack(read_video(original / "video.mp4")), np.stack(read_video(final[3])))
    (tmp_path / "junk.json").write_text('{"version": 1}')
    with pytest.raises(Exception, match="not a run record"):
        list(handlers.replay_run(str(tmp_path / "junk.json"), 16, runtime.new_session(), None))
