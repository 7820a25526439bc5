"""python -m pipelines.cli: writes an H.264 mp4; bad setups exit 2 with one message."""
from __future__ import annotations

import logging

from pipelines.cli import main
from pipelines.loading.video_io import count_frames

from conftest import ROOT


def test_cli_writes_mp4_with_all_frames(tmp_path):
    out = tmp_path / "out.mp4"
    assert main(["--prompt", "a kite", "--blocks", "2", "--seed", "3", "--device", "cpu", "--out", str(out)]) == 0
    assert count_frames(out) == 21


def test_cli_image_to_video_and_low_memory_profile(tmp_path):
    out = tmp_path / "i2v.mp4"
    args = ["--prompt", "clouds", "--blocks", "1", "--device", "cpu", "--memory-profile", "low",
            "--image", str(ROOT / "assets/examples/clouds_drifting_over_mountains.png"), "--out", str(out)]
    assert main(args) == 0
    assert count_frames(out) == 13


def test_cli_reports_missing_weights_without_traceback(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    code = main(["--config", "configs/self_forcing_dmd.yaml", "--weights", str(tmp_path), "--prompt", "x",
                 "--device", "cpu", "--out", str(tmp_path / "x.mp4")])
    assert code == 2
    assert "Wan-AI/Wan2.1-T2V-1.3B" in caplog.text and "Traceback" not in caplog.text


def test_cli_reports_bad_request_and_bad_image(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    assert main(["--prompt", " ", "--device", "cpu", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "enter a prompt" in caplog.text
    not_image = tmp_path / "x.png"
    not_image.write_text("nope")
    assert main(["--prompt", "x", "--image", str(not_image), "--device", "cpu", "--out", str(tmp_path / "y.mp4")]) == 2
