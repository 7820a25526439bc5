"""What the UI says and offers comes from the model's config (`demo:`): banner note, pose note, examples."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from demo.runtime import load_runtime
from demo.ui import ROOT, build_demo, demo_examples
from pipelines.config import load_config
from pipelines.loading.media import read_video
from training.examples import FOLDER, write_examples


def test_the_default_says_it_is_the_shapes_model_and_what_to_try():
    banner = load_runtime("configs/tiny.yaml", None, "cpu").banner()
    assert "trained on synthetic shapes" in banner and "try: a red circle moves to the right" in banner


def test_the_random_config_says_what_it_is_in_the_banner_and_the_pose_tab():
    runtime = load_runtime("configs/tiny_random.yaml", None, "cpu")
    assert "random weights" in runtime.banner()
    page = json.dumps(build_demo(runtime).config, default=str)
    assert "random* pose encoders" in page
    assert "A corgi runs along a beach at sunset" in page  # the UI's own examples: the config lists none


def test_the_shapes_model_offers_prompts_images_and_a_pose_example_it_knows():
    demo = load_config("configs/tiny.yaml").demo
    assert "a red circle moves to the right" in demo.note
    images, poses = demo_examples(demo)
    assert [prompt for _, prompt in images] == ["a blue star rises on a dark blue background",
                                                "a cyan circle falls on a black background"]
    [(reference, video, is_pose_video, prompt)] = poses
    assert is_pose_video and prompt == "an orange stick figure dances on a dark blue background"
    assert Image.open(reference).size == (96, 64) and len(read_video(video)) == 33


def test_the_page_shows_the_configs_examples(tmp_path):
    runtime = load_runtime("configs/tiny.yaml", str(tmp_path), "cpu")  # its weights need not be there
    page = json.dumps(build_demo(runtime).config, default=str)
    assert "a yellow star falls on a black background" in page
    assert "an_orange_stick_figure_dances_on_a_dark_blue_background.mp4" in page
    assert "A corgi runs along a beach" not in page


def test_the_committed_examples_are_what_training_examples_renders(tmp_path):
    written = write_examples(tmp_path)
    assert sorted(p.relative_to(tmp_path) for p in written) == sorted(
        p.relative_to(FOLDER) for p in FOLDER.rglob("*") if p.is_file())
    for path in written:
        committed = FOLDER / path.relative_to(tmp_path)
        if path.suffix == ".png":
            assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(committed)))
        else:  # H.264 files may differ in bytes between encoder builds; their frames may not
            assert np.abs(np.stack(read_video(path)).astype(int) - np.stack(read_video(committed)).astype(int)).mean() < 2
    assert FOLDER.is_relative_to(ROOT / "assets")
