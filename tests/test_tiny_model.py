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


@pytest.mark.parametrize("case", ["image_to_video", "image_to_video_bright"])
def test_image_to_video_starts_on_the_image(scores, case):
    """On the world's dark backgrounds, and on brighter ones (the model before the world had any returned
    them at ~13 dB)."""
    assert scores[case]["first_frame_psnr_db"] >= 25.0


SHAPE_FADES_ON_BEIGE = pytest.mark.xfail(strict=True, reason=(
    "on beige backgrounds the shape fades in some clips: the shipped student keeps it in 77 % of the frames, "
    "its teacher in 90 % (bench/results/h200_tiny_world_grown_student.json; issue 29)"))


@pytest.mark.parametrize("case", ["image_to_video",
                                  pytest.param("image_to_video_bright", marks=SHAPE_FADES_ON_BEIGE)])
def test_image_to_video_keeps_the_shape(scores, case):
    assert scores[case]["colour_present"] >= 0.8


def test_the_stick_figure_follows_the_driving_pose(scores):
    pose = scores["pose"]
    assert pose["driven"] <= 0.6 * pose["shuffled"], pose
