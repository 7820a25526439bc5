"""Acceptance of the trained tiny shapes model (assets/tiny_shapes, the default of configs/tiny.yaml,
written by `python -m training.tiny --install`): held-out prompts through the app's own pipeline on the CPU.

Each threshold fails on untrained weights: a model that has not learnt its world scores 0 % colour
blobs (bench/results/h100_tiny_training_attempt2.json)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def scores():
    from training.scorecard import evaluate_model

    return evaluate_model(None, "cpu")


def test_text_to_video_draws_the_named_colour(scores):
    t2v = scores["text_to_video"]
    assert t2v["prompts"] >= 20
    assert t2v["colour_found"] >= 0.8, scores["text_to_video_prompts"]


def test_text_to_video_moves_the_shape_the_named_way(scores):
    assert scores["text_to_video"]["direction_ok"] >= 0.7, scores["text_to_video_prompts"]


def test_a_caption_naming_no_background_still_draws_the_named_colour(scores):
    unnamed = scores["text_to_video_no_background"]
    assert unnamed["prompts"] >= 20
    assert unnamed["colour_found"] >= 0.8, scores["text_to_video_no_background_prompts"]


BRIGHT_NOT_YET = pytest.mark.xfail(strict=True, reason=(
    "the shipped VAE never saw a bright background (13 dB); the model continued on the grown world "
    "(bench/results/h200_tiny_world_grown.json) reaches 29 dB but lost direction on named prompts, so it "
    "does not ship yet (issue 29)"))


@pytest.mark.parametrize("case", ["image_to_video", pytest.param("image_to_video_bright", marks=BRIGHT_NOT_YET)])
def test_image_to_video_starts_on_the_image_and_keeps_the_shape(scores, case):
    """On the world's dark backgrounds, and on brighter ones (which the VAE returned at ~13 dB before the
    world had any)."""
    i2v = scores[case]
    assert i2v["first_frame_psnr_db"] >= 25.0
    assert i2v["colour_present"] >= 0.8


def test_the_stick_figure_follows_the_driving_pose(scores):
    pose = scores["pose"]
    assert pose["driven"] <= 0.6 * pose["shuffled"], pose
