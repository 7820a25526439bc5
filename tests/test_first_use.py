"""What a new user met first: the README's API example, input checks, the API surface, logs, outputs."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from test_memory import REAL

from demo.outputs import OutputStore
from pipelines.loading.video_io import count_frames
from pipelines.memory.planner import plan_memory

from app_server import AppServer

ROOT = Path(__file__).resolve().parent.parent
T2V_ARGS = ("", 7, False, 1, 16, "96x64")


@pytest.fixture(scope="module")
def client(app_server):
    return Client(app_server.url, verbose=False)


def test_readme_api_example_runs_as_written_against_the_default_app(app_server, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    api_section = readme[readme.index("## API"):]
    code = re.search(r"```python\n(.*?)```", api_section, re.S).group(1)
    assert 'Client("http://127.0.0.1:7860/")' in code
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(code.replace("http://127.0.0.1:7860/", app_server.url), namespace)  # noqa: S102 - the README's own code
    assert namespace["status"].startswith("Done.") and namespace["seed"] == 42
    assert count_frames(namespace["mp4_path"]) == 21
    assert count_frames(namespace["image_result"][3]) == 25


def test_non_image_upload_gets_the_apps_own_message(client, tmp_path, app_server):
    fake = tmp_path / "renamed.png"
    fake.write_bytes(b"%PDF-1.4 not an image at all" * 20)
    with pytest.raises(AppError, match="Could not read the upload as an image") as error:
        client.predict(handle_file(str(fake)), "x", *T2V_ARGS, api_name="/image_to_video")
    assert "/tmp/" not in str(error.value) and "gradio" not in str(error.value).lower()


@pytest.mark.parametrize("seed", [2**63, 1e30, 2**53, -1, 2.5])
def test_seeds_that_cannot_be_honoured_are_refused(client, seed):
    with pytest.raises(AppError, match="Seed must be a whole number from 0 to 9007199254740991"):
        client.predict("x", "", seed, False, 1, 16, "96x64", api_name="/text_to_video")


def test_the_seed_used_is_the_seed_given(client):
    largest = 2**53 - 1
    first = client.predict("a comet", "", largest, False, 1, 16, "96x64", api_name="/text_to_video")
    again = client.predict("a comet", "", first[4], False, 1, 16, "96x64", api_name="/text_to_video")
    assert first[4] == again[4] == largest
    assert Path(first[3]).read_bytes() == Path(again[3]).read_bytes()


def test_non_integer_blocks_and_bad_fps_are_refused(client):
    with pytest.raises(AppError, match="Blocks must be a whole number"):
        client.predict("x", "", 1, False, 2.5, 16, "96x64", api_name="/text_to_video")
    with pytest.raises(AppError, match="Number of blocks must be between 1 and 12"):
        client.predict("x", "", 1, False, 500, 16, "96x64", api_name="/text_to_video")
    with pytest.raises(AppError, match="Output FPS must be a whole number from 8 to 30"):
        client.predict("x", "", 1, False, 1, 300, "96x64", api_name="/text_to_video")


def test_truncated_prompt_is_reported(client):
    status = client.predict("a red circle moves to the right " * 12, *T2V_ARGS, api_name="/text_to_video")[2]
    assert status.startswith("Done.") and re.search(r"prompt cut to its first 64 of \d+ tokens", status), status
    assert "prompt cut" not in client.predict("short", *T2V_ARGS, api_name="/text_to_video")[2]


def test_stop_while_idle_changes_nothing(client):
    assert client.predict(api_name="/stop_text_to_video") == "Nothing is running."
    assert client.predict("after a stop", *T2V_ARGS, api_name="/text_to_video")[2].startswith("Done.")


def test_api_lists_only_public_endpoints_with_named_outputs(client):
    api = client.view_api(print_info=False, return_format="dict")
    assert sorted(api["named_endpoints"]) == sorted(
        ["/text_to_video", "/image_to_video", "/pose_animation", "/stop_text_to_video", "/stop_image_to_video",
         "/stop_pose_animation", "/steer_text_to_video", "/steer_image_to_video", "/steer_pose_animation",
         "/replay_run", "/branch", "/rewind", "/video_to_video", "/stop_video_to_video",
         "/steer_video_to_video"])  # no /SessionControl, no /set_memory_profile without an admin token
    assert not api["unnamed_endpoints"]
    returns = [r["label"] for r in api["named_endpoints"]["/text_to_video"]["returns"]]
    assert returns == ["Live stream", "Latest frame", "Status", "Download mp4", "Seed used", "Extended prompt",
                       "Prompt timeline", "Run", "Drift"]


def test_expected_errors_leave_one_log_line_and_no_traceback(client, app_server):
    with pytest.raises(AppError):
        client.predict("   ", *T2V_ARGS, api_name="/text_to_video")
    with pytest.raises(AppError):
        client.predict(None, "x", *T2V_ARGS, api_name="/image_to_video")
    with pytest.raises(AppError):
        client.predict("x", "", 1, False, 500, 16, "96x64", api_name="/text_to_video")
    log = app_server.log_path.read_text()
    assert "refused request: Please enter a prompt." in log
    assert "refused request: Please upload an image." in log
    assert "Traceback" not in log


def test_metrics_endpoint_and_log(client, app_server):
    client.predict("a metric", *T2V_ARGS, api_name="/text_to_video")
    with urllib.request.urlopen(app_server.url + "metrics", timeout=10) as response:
        text = response.read().decode()
    generations = float(re.search(r'^sf_generations_total\{tab="t2v"\} (\S+)$', text, re.M).group(1))
    assert generations >= 1
    for series in ("sf_time_to_first_frame_seconds_bucket", "sf_frames_per_second_bucket", "sf_queue_length",
                   "sf_browser_time_to_first_frame_seconds_count", "sf_generation_failures_total"):
        assert series in text or series.replace("_total", "_created") in text, series
    log = Path(os.environ["SF_OUTPUTS_DIR"]) / "metrics.jsonl"  # (conftest: the tests' own outputs folder)
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    last = runs[-1]
    assert last["tab"] == "t2v" and last["resolution"] == "96x64" and last["blocks_done"] == 1
    assert last["server_first_frame_s"] > 0 and last["fps"] > 0 and not last["cancelled"] and not last["failed"]


def test_outputs_and_admin_token_on_a_server_of_its_own(tmp_path):
    outputs = tmp_path / "outputs"
    server = AppServer("--outputs", str(outputs), "--admin-token", "s3cret")
    try:
        api = Client(server.url, verbose=False)
        with pytest.raises(AppError, match="admin token"):
            api.predict("low", "guess", api_name="/set_memory_profile")
        assert "**low**" in api.predict("low", "s3cret", api_name="/set_memory_profile")
        video = api.predict("x", *T2V_ARGS, api_name="/text_to_video")[3]
        assert count_frames(video) == 9
        assert list((outputs / "sessions").glob("server-*/sf-session-*/run001/video.mp4"))
        log = outputs / "metrics.jsonl"
        for path in (log, log.resolve()):  # the run log is not among the files the server hands out
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{server.url}gradio_api/file={path}", timeout=10)
            assert refused.value.code in (403, 404)
    finally:
        server.stop()
    assert not list((outputs / "sessions").glob("server-*")), "session videos must go when the server stops"
    assert json.loads((outputs / "metrics.jsonl").read_text().splitlines()[-1])["profile"] == "low"


def test_output_cap_removes_the_oldest_runs(tmp_path):
    store = OutputStore(tmp_path, cap_bytes=2500)
    session = store.new_session_dir()
    for index in range(4):
        run = session / f"run{index:03d}"
        run.mkdir()
        (run / "video.mp4").write_bytes(b"x" * 1000)
        import os
        os.utime(run, (index, index))
    store.enforce_cap()
    assert sorted(p.name for p in session.iterdir()) == ["run002", "run003"]
    store.remove_sessions()
    assert not store.sessions.exists() and (tmp_path / "sessions").is_dir()


def test_cpu_plan_does_not_claim_gpu_residency():
    plan = plan_memory(REAL, 1 << 50, 21, 3, device_type="cpu")
    for text in (plan.summary(), plan.summary(markdown=False)):
        assert "GPU memory" not in text and "resident on the GPU" not in text and "CPU" in text
    assert "**" not in plan.summary(markdown=False) and "**high**" in plan.summary()


# ---------------------------------------------------------------- command line


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_help_is_light_and_complete():
    probe = ("import runpy, sys\nsys.argv = ['x', '--help']\ntry:\n    runpy.run_module('pipelines.cli', "
             "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('HEAVY' if {'torch', 'diffusers', "
             "'transformers'} & set(sys.modules) else 'LIGHT')")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("LIGHT"), result.stdout + result.stderr
    help_text = result.stdout
    assert help_text.startswith("usage: python -m pipelines.cli")
    for option in ("--resolution", "--memory-profile", "--no-ema", "--extend-prompt", "[SF_CONFIG]",
                   "(default: auto)", "(default: output.mp4)"):
        assert option in help_text, option


def test_cli_resolution_and_bad_blocks(tmp_path):
    out = tmp_path / "tall.mp4"
    done = _run_cli("--prompt", "a tower", "--blocks", "1", "--resolution", "64x96", "--device", "cpu",
                    "--out", str(out))
    assert done.returncode == 0, done.stderr
    import imageio_ffmpeg
    reader = imageio_ffmpeg.read_frames(str(out))
    assert next(reader)["size"] == (64, 96)
    reader.close()
    bad = _run_cli("--prompt", "x", "--blocks", "0", "--device", "cpu", "--out", str(tmp_path / "no.mp4"))
    assert bad.returncode == 2 and "Number of blocks must be between 1 and 12" in bad.stderr
    assert "block/s" not in bad.stderr and "0%" not in bad.stderr  # no progress bar before the error
    wrong = _run_cli("--prompt", "x", "--resolution", "big", "--device", "cpu", "--out", str(tmp_path / "no.mp4"))
    assert wrong.returncode == 2 and "Resolution must look like 832x480" in wrong.stderr


def test_bench_compare_flags_regressions(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from compare import main as compare_main

    base = {"device": "H100", "fps_median": 27.0, "first_frames_s_median": 0.25,
            "profiles": {"low@8GiB": {"fps_median": 8.0, "first_frames_s_median": 1.0}}}
    cases = {"same": (base, 0), "faster": ({**base, "fps_median": 30.0}, 0),
             "slower_fps": ({**base, "fps_median": 25.0}, 1), "later_first_frame": ({**base, "first_frames_s_median": 0.27}, 1),
             "slower_low_profile": ({**base, "profiles": {"low@8GiB": {"fps_median": 7.0, "first_frames_s_median": 1.0}}}, 1),
             "within_5_percent": ({**base, "fps_median": 26.0, "first_frames_s_median": 0.26}, 0)}
    (tmp_path / "base.json").write_text(json.dumps(base))
    for name, (new, expected) in cases.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(new))
        assert compare_main([str(tmp_path / f"{name}.json"), str(tmp_path / "base.json")]) == expected, name


def test_dwpose_files_are_looked_up_in_the_weights_folder(tmp_path):
    from demo.runtime import load_runtime

    runtime = load_runtime("configs/tiny.yaml", str(tmp_path), "cpu")
    assert runtime.engine.poser.detector_dir == tmp_path / "dwpose"
    assert str(tmp_path / "dwpose" / "yolox_l.onnx") in runtime.engine.poser.detector_missing()
    assert "--weights" in load_runtime("configs/tiny.yaml", None, "cpu").engine.poser.detector_missing()


def test_prompt_switch_through_the_api_affects_only_that_session(app_server):
    import time

    runner, other = Client(app_server.url, verbose=False), Client(app_server.url, verbose=False)
    assert other.predict("x", "recache", api_name="/steer_text_to_video") == "Nothing is running: press Generate."
    job = runner.submit("a red fox", "", 3, False, 8, 16, "96x64", api_name="/text_to_video")
    deadline = time.monotonic() + 60
    while not any("Block 2/8" in str(update[2]) for update in job.outputs()):
        assert time.monotonic() < deadline and not job.done()
        time.sleep(0.05)
    assert runner.predict("a blue whale", "recache", api_name="/steer_text_to_video").startswith("New prompt")
    assert other.predict("y", "plain", api_name="/steer_text_to_video") == "Nothing is running: press Generate."
    final = job.result()
    assert final[2].startswith("Done.")
    timeline = [u[6] for u in job.outputs() if isinstance(u[6], str) and u[6]][-1]
    assert "a red fox" in timeline and "a blue whale" in timeline and "switch took" in timeline
    with pytest.raises(AppError, match="sideways"):
        runner.predict("z", "sideways", api_name="/steer_text_to_video")


def test_continuous_run_through_the_api_until_stop(app_server):
    import time

    client = Client(app_server.url, verbose=False)
    job = client.submit("a long river", "", 1, False, 1, 16, "96x64", False, "", "none", 1.0, True,
                        api_name="/text_to_video")
    deadline = time.monotonic() + 90
    while not any(" 45 frames" in str(update[2]) for update in job.outputs()):  # 4 blocks (1 + 4 * 11 frames)
        assert time.monotonic() < deadline and not job.done(), [u[2] for u in job.outputs()]
        time.sleep(0.05)
    assert all("(stops at 10 min)" in str(u[2]) for u in job.outputs()[1:] if "frames" in str(u[2]))
    assert client.predict(api_name="/stop_text_to_video").startswith("Stopping")
    final = job.result()
    assert final[2].startswith("Stopped.") and "s of video (stops at 10 min)" in final[2], final[2]
    frames = int(re.search(r"(\d+) frames", final[2]).group(1))
    blocks = ((frames - 1) // 4 + 1) // 3
    assert 4 <= blocks < 10 * 60 * 16 // 12 and frames == 1 + 4 * (3 * blocks - 1)  # (the 10-minute limit)
    assert count_frames(final[3]) == frames


def test_a_busy_port_is_said_before_loading(app_server):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "app.py", "--port", str(app_server.port)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and f"Port {app_server.port}" in result.stderr and "--port" in result.stderr
    assert time.monotonic() - started < 30  # (no model was loaded)
