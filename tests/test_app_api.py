"""The launched app through gradio_client: every tab's endpoint, bad inputs, recovery."""
from __future__ import annotations

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from pipelines.loading.video_io import count_frames, write_video

from conftest import ROOT

ROOT_EXAMPLE = str(ROOT / "assets/examples/clouds_drifting_over_mountains.png")
T2V_ARGS = ("", 7, False, 2, 16, "96x64")  # negative, seed, randomize, blocks, fps, resolution


@pytest.fixture(scope="module")
def client(app_server):
    return Client(app_server.url, verbose=False)


def test_text_to_video_endpoint_returns_mp4_with_all_frames(client):
    segment, preview, status, video, seed, extended, timeline, run, drift = client.predict(
        "a lighthouse", *T2V_ARGS, api_name="/text_to_video")
    assert status.startswith("Done.") and "Block 2/2" in status
    assert seed == 7
    assert count_frames(video) == 21  # 1 + 4*5 for 2 blocks of 3 latent frames
    rows = drift["data"]  # (block, statistic, value) per block and statistic
    assert {row[0] for row in rows} == {1, 2} and any(row[1] == "drift score" for row in rows)


def test_image_to_video_endpoint(client, tmp_path):
    result = client.predict(handle_file(ROOT_EXAMPLE), "clouds drift", *T2V_ARGS, api_name="/image_to_video")
    assert count_frames(result[3]) == 25  # the image frame + 2 blocks x 12 frames


def test_other_resolution_and_seed_randomisation(client):
    result = client.predict("a lighthouse", "", 0, True, 1, 12, "64x96", api_name="/text_to_video")
    assert count_frames(result[3]) == 9
    assert isinstance(result[4], (int, float))


@pytest.fixture(scope="module")
def pose_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("pose") / "pose.mp4"
    frames = np.zeros((20, 64, 96, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        frame[20:44, 10 + 3 * i:20 + 3 * i] = (255, 0, 0)  # a moving red limb
    write_video(path, [frames], 16)
    return str(path)


def test_pose_video_endpoint_streams_reference_plus_blocks(client, pose_video):
    result = client.predict(handle_file(ROOT_EXAMPLE), handle_file(pose_video), True, False, "dance",
                            *T2V_ARGS, api_name="/pose_animation")
    assert count_frames(result[3]) == 25  # reference frame + 2 blocks x 12 frames


def test_pose_extraction_names_missing_dwpose_files(client, pose_video):
    with pytest.raises(AppError, match="yolox_l.onnx"):
        client.predict(handle_file(ROOT_EXAMPLE), handle_file(pose_video), False, False, "dance", *T2V_ARGS,
                       api_name="/pose_animation")


def test_pose_tab_requires_both_uploads(client):
    with pytest.raises(AppError, match="reference image and a driving video"):
        client.predict(None, None, True, False, "dance", *T2V_ARGS, api_name="/pose_animation")


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_rejected(client, prompt):
    with pytest.raises(AppError, match="enter a prompt"):
        client.predict(prompt, *T2V_ARGS, api_name="/text_to_video")


def test_missing_image_is_rejected(client):
    with pytest.raises(AppError, match="upload an image"):
        client.predict(None, "x", *T2V_ARGS, api_name="/image_to_video")


def test_non_image_upload_is_rejected(client, tmp_path):
    fake = tmp_path / "not_an_image.png"
    fake.write_bytes(b"this is text, not a PNG" * 10)
    with pytest.raises(AppError):
        client.predict(handle_file(str(fake)), "x", *T2V_ARGS, api_name="/image_to_video")


def test_huge_image_is_rejected(client, tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("RGB", (8000, 6000), (10, 20, 30)).save(huge)
    with pytest.raises(AppError, match="megapixels"):
        client.predict(handle_file(str(huge)), "x", *T2V_ARGS, api_name="/image_to_video")


def test_too_many_blocks_is_rejected_and_app_keeps_serving(client):
    with pytest.raises(AppError):
        client.predict("x", "", 1, False, 500, 16, "96x64", api_name="/text_to_video")
    result = client.predict("after errors", *T2V_ARGS, api_name="/text_to_video")
    assert count_frames(result[3]) == 21


def test_a_drift_guard_out_of_range_is_refused_before_it_queues(client):
    # (after the shared controls: extend, extended prompt, LoRA, its strength, continuous, fast decoder, drift guard)
    with pytest.raises(AppError, match="drift guard's threshold must be above 0 and at most 1, got 1.5"):
        client.predict("x", *T2V_ARGS, False, "", None, 1.0, False, False, 1.5, api_name="/text_to_video")


def test_preview_is_last_frame_of_stream(client):
    job = client.submit("a lighthouse", *T2V_ARGS, api_name="/text_to_video")
    outputs = list(job)
    previews = [o[1] for o in outputs if isinstance(o[1], str)]
    assert len(previews) >= 2
    frames = [np.asarray(Image.open(p)) for p in previews]
    assert frames[0].shape == (64, 96, 3) and not np.array_equal(frames[0], frames[-1])


def test_fast_decoder_is_an_api_option_refused_without_its_file(client):
    with pytest.raises(AppError, match="taew2_1.pth"):
        client.predict("a lighthouse", *T2V_ARGS, fast_decode=True, api_name="/text_to_video")
    result = client.predict("a lighthouse", *T2V_ARGS, fast_decode=False, api_name="/text_to_video")
    assert result[2].startswith("Done.")


def test_branch_and_rewind_endpoints_continue_the_callers_own_runs(client, app_server):
    first = client.predict("a red circle moves to the right on a dark blue background", "", 9, False, 3, 16, "96x64",
                           api_name="/text_to_video")
    run = first[7]
    branch = client.predict(run, 2, "a green square moves up on a black background", "recache", False, None, 16,
                            api_name="/branch")
    assert branch[2].startswith("Done. Block 3/3") and "branch from block 2" in branch[2]
    assert count_frames(branch[3]) == count_frames(first[3]) and branch[7] == run + 1
    rewound = client.predict(branch[7], 3, 1234, 16, api_name="/rewind")
    assert rewound[2].startswith("Done.") and rewound[7] == run + 2
    with pytest.raises(AppError, match="has 3 blocks: branch from block 3 or earlier"):
        client.predict(run, 4, "x", "recache", False, None, 16, api_name="/branch")
    # Another client (another visitor) has no such run.
    with pytest.raises(AppError, match=f"There is no run {run} in this session"):
        Client(app_server.url, verbose=False).predict(run, 2, 77, 16, api_name="/rewind")


def test_video_to_video_endpoint_restyles_an_uploaded_video(client, tmp_path):
    from training.synthetic import SyntheticWorld, render

    scene = SyntheticWorld(0, frames=33).held_out_scene(0, size=(64, 96))
    path = tmp_path / "input.mp4"
    write_video(path, [render(scene)], 16)
    result = client.predict(handle_file(str(path)), 0.3, False, "a green square moves up on a black background",
                            *T2V_ARGS, api_name="/video_to_video")
    assert result[2].startswith("Done. Block 2/2") and count_frames(result[3]) == 21
    # An input that is not a video, and a strength out of range: one clear message each.
    fake = tmp_path / "not_a_video.mp4"
    fake.write_bytes(b"not a video at all" * 50)
    with pytest.raises(AppError, match="Could not read the upload as a video"):
        client.predict(handle_file(str(fake)), 0.3, False, "x", *T2V_ARGS, api_name="/video_to_video")
    with pytest.raises(AppError, match="Strength must be above 0 and at most 1"):
        client.predict(handle_file(str(path)), 1.5, False, "x", *T2V_ARGS, api_name="/video_to_video")
