"""The synthetic world, its evaluator, and `python -m training.tiny` end to end (a few steps, CPU)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from training.evaluate import keypoint_error, score_video, summarise
from training.objective import FlowObjective, flow_loss, position_weights
from training.synthetic import (
    ALL_BACKGROUND_COLOURS,
    BRIGHT_BACKGROUND_COLOURS,
    DIRECTIONS,
    MOTION_PHRASES,
    SHAPE_COLOURS,
    SIZES,
    SyntheticWorld,
    figure_keypoints,
    pose_frames,
    render,
)


def test_world_is_seeded_and_captions_describe_the_scene():
    world = SyntheticWorld(seed=3)
    for index in range(40):
        scene = world.scene(index)
        assert scene == SyntheticWorld(seed=3).scene(index)
        frames = render(scene)
        assert frames.shape == (37, scene.height, scene.width, 3) and (scene.height, scene.width) in SIZES
        assert np.array_equal(frames, render(scene))
        named = scene.background.describe() in scene.caption
        assert named or not any(name in scene.caption for name in ALL_BACKGROUND_COLOURS if name not in
                                (*SHAPE_COLOURS, "blue"))  # "blue" also names a shape
        for spec in scene.shapes:
            assert f"{spec.colour} {spec.shape} " in scene.caption
            assert any(phrase in scene.caption for phrase in MOTION_PHRASES[spec.motion])
        if scene.figure is not None:
            assert f"{scene.figure.colour} stick figure" in scene.caption
            assert pose_frames(scene).shape == frames.shape
    assert world.scene(0) != SyntheticWorld(seed=4).scene(0)


def test_some_training_clips_have_bright_backgrounds_and_captions_that_leave_the_background_out():
    world = SyntheticWorld()
    scenes = [world.scene(index) for index in range(600)]
    bright = np.mean([scene.background.colours[0] in BRIGHT_BACKGROUND_COLOURS for scene in scenes])
    unnamed = np.mean([scene.background.describe() not in scene.caption for scene in scenes])
    assert 0.18 < bright < 0.32 and 0.1 < unnamed < 0.2
    beige = next(scene for scene in scenes if scene.background.colours == ("beige",))
    assert (render(beige)[0, 0, 0].astype(int) - BRIGHT_BACKGROUND_COLOURS["beige"]).__abs__().max() <= 1
    # held-out variants: the same prompt without its background phrase, and bright backgrounds
    named, plain = world.held_out_scene(3), world.held_out_scene(3, name_background=False)
    assert plain.shapes == named.shapes and plain.background == named.background
    assert named.background.describe() in named.caption and "background" not in plain.caption
    assert world.held_out_scene(3, bright=True).background.colours[0] in BRIGHT_BACKGROUND_COLOURS


def test_the_evaluator_finds_shapes_on_bright_backgrounds():
    world = SyntheticWorld()
    truth = []
    for index in range(12):
        scene = world.held_out_scene(index, bright=True)
        spec = scene.shapes[0]
        truth.append(score_video(render(scene)[:33], scene.caption, spec.colour, spec.motion))
    assert summarise(truth) == {"prompts": 12, "colour_found": 1.0, "direction_ok": 1.0}


def test_a_grown_caption_vocabulary_reads_known_captions_exactly_as_before():
    """A trained encoder moved to a world with more words: old words keep their rows, so a caption of
    known words encodes to the same embedding; a new word no longer reads as <unk>."""
    from transformers import UMT5EncoderModel

    from pipelines.loading.text_encoder import PromptEncoder, umt5_config
    from training.caption_encoder import grown_to_world, word_tokenizer, world_vocabulary

    old = word_tokenizer([word for word in world_vocabulary() if word not in ("beige", "light")])
    torch.manual_seed(0)
    model = UMT5EncoderModel(umt5_config(len(old), 32, 8, 64, 2, 4))
    caption = "a white star moves up on a dark gray background"
    before = PromptEncoder(old, model, 16).encode(caption, "cpu").clone()
    grown = grown_to_world(old, model)
    after = PromptEncoder(grown, model, 16)
    assert torch.equal(after.encode(caption, "cpu"), before)
    assert grown.convert_ids_to_tokens(after.tokenize(["a beige background"], "cpu")[0][0, :2].tolist()) == \
        ["a", "beige"]
    control = PromptEncoder(old, model, 16)  # the old ids against the grown rows: a different embedding
    assert not torch.allclose(control.encode(caption, "cpu"), before)


def test_held_out_combinations_never_appear_in_training_but_their_pairs_do():
    world = SyntheticWorld()
    held = world.held_out
    assert len(held) >= 20
    trained = {(s.colour, s.shape, s.motion) for i in range(3000) for s in world.scene(i).shapes}
    assert not trained & held
    for colour, shape, motion in held:
        assert any(t[:2] == (colour, shape) for t in trained)
        assert any(t[1:] == (shape, motion) for t in trained)
        assert any((t[0], t[2]) == (colour, motion) for t in trained)
    scene = world.held_out_scene(0)
    assert (scene.shapes[0].colour, scene.shapes[0].shape, scene.shapes[0].motion) in held


def test_evaluator_accepts_the_true_clips_and_rejects_wrong_ones():
    world = SyntheticWorld()
    truth, static, reversed_, noise = [], [], [], []
    rng = np.random.default_rng(0)
    for index in range(20):
        scene = world.held_out_scene(index)
        spec, frames = scene.shapes[0], render(scene)[:33]
        truth.append(score_video(frames, scene.caption, spec.colour, spec.motion))
        static.append(score_video(frames[:1].repeat(33, 0), scene.caption, spec.colour, spec.motion))
        reversed_.append(score_video(frames[::-1], scene.caption, spec.colour, spec.motion))
        noise.append(score_video(rng.integers(0, 256, frames.shape, dtype=np.uint8), scene.caption, spec.colour,
                                 spec.motion))
    assert summarise(truth) == {"prompts": 20, "colour_found": 1.0, "direction_ok": 1.0}
    assert summarise(static)["colour_found"] == 1.0 and summarise(static)["direction_ok"] == 0.0
    assert summarise(reversed_)["direction_ok"] == 0.0
    assert summarise(noise)["colour_found"] == 0.0

    scene = world.figure_scene_at(0)
    frames = render(scene)
    keypoints = np.stack([figure_keypoints(scene.figure, i, scene.height, scene.width) for i in range(scene.frames)])
    shuffled = frames[np.random.default_rng(0).permutation(len(frames))]
    assert keypoint_error(frames, keypoints, scene.figure.colour) < 0.3 * keypoint_error(shuffled, keypoints,
                                                                                         scene.figure.colour)


def test_the_vae_loss_can_weigh_the_shape_pixels_more_than_the_background():
    from diffusers import AutoencoderKLWan

    from training.autoencoder import foreground_weights, reconstruction_loss

    scene = SyntheticWorld().held_out_scene(0)
    frames = render(scene)[:5]
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    weights = foreground_weights(pixels, 10.0)[0, 0]
    shape = np.abs(frames.astype(int) - frames[0, 0, 0].astype(int)).max(-1) > 0.1 * 127.5  # not the background
    assert weights.max() == 11.0 and weights.min() == 1.0
    assert np.array_equal(weights.numpy() == 11.0, shape)
    assert 0.005 < shape.mean() < 0.2  # a few per cent of the frame: why the weighting matters

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4)
    torch.manual_seed(1)
    plain, _ = reconstruction_loss(vae, pixels, 0.0)
    torch.manual_seed(1)
    decoded = vae.decode(vae.encode(pixels).latent_dist.sample()).sample
    error = decoded - pixels
    assert torch.allclose(plain, error.abs().mean() + error.pow(2).mean(), rtol=1e-5)  # weight 0: the plain loss
    torch.manual_seed(1)
    weighted, _ = reconstruction_loss(vae, pixels, 0.0, foreground_weight=10.0)
    per_pixel = (error.abs() + error.pow(2)).mean(1)[0]
    expected = (per_pixel[torch.from_numpy(shape)].mean() * 11 * shape.sum() + per_pixel[~torch.from_numpy(shape)].sum()) \
        / (11 * shape.sum() + (~shape).sum())
    assert torch.allclose(weighted, expected, rtol=1e-4)


def test_few_step_objective_trains_at_the_samplers_sigmas():
    table = (1.0, 0.75, 0.5, 0.25)
    sigma, _ = FlowObjective(shift=1.0, few_step_fraction=1.0, few_step_sigmas=table).block_sigmas(
        64, 3, torch.Generator().manual_seed(0))
    assert set(sigma.flatten().tolist()) == set(table)
    mixed, _ = FlowObjective(shift=1.0, few_step_fraction=0.5, few_step_sigmas=table).block_sigmas(
        400, 3, torch.Generator().manual_seed(0))
    on_table = np.isin(mixed.numpy(), table).mean()
    assert 0.4 < on_table < 0.6
    with pytest.raises(ValueError, match="few_step_sigmas"):
        FlowObjective(few_step_fraction=0.5)


def test_the_flow_loss_can_weigh_the_latent_positions_of_a_shape_more():
    x0 = torch.zeros(2, 16, 3, 8, 12)
    x0[0, :, 1, 2:4, 5:7] = 2.0  # a shape in one frame of the first clip; the rest is a plain background
    weights = position_weights(x0, 4.0)
    assert weights.shape == (2, 3, 8, 12)
    assert (weights[0, 1, 2:4, 5:7] == 5).all() and weights.sum() == 2 * 3 * 8 * 12 + 4 * 4
    target, prediction = torch.zeros_like(x0), torch.zeros_like(x0)
    prediction[0, :, 1, 2, 5] = 1.0  # the error sits on a shape position
    frames = torch.ones(2, 3)
    plain = flow_loss(prediction, target, frames)
    assert torch.isclose(plain, torch.tensor(1 / (2 * 3 * 8 * 12)))
    assert torch.isclose(flow_loss(prediction, target, frames, weights), 5 / weights.sum())
    frames[0, 1] = 0  # a frame out of the loss takes its weighted positions with it
    assert flow_loss(prediction, target, frames, weights) == 0


@pytest.fixture(scope="module")
def trained_from_scratch(tmp_path_factory):
    """Every stage of training.tiny for a couple of steps: a model folder the app's loader reads."""
    from training import tiny

    out = tmp_path_factory.mktemp("tiny")
    assert tiny.main(["--out", str(out), "--clips", "12", "--caption-steps", "2", "--caption-batch", "8",
                      "--vae-steps", "1", "--vae-long-steps", "1", "--vae-batch", "2", "--vae-long-batch", "1", "--teacher-steps", "2",
                      "--student-steps", "2", "--workers", "1", "--cpu", "--skip-evaluation"]) == 0
    return out


def test_training_from_scratch_writes_a_model_the_app_loads(trained_from_scratch):
    import json

    from pipelines.builder import build_pipeline
    from pipelines.config import load_config
    from pipelines.core import GenerationRequest
    from pipelines.pose.animation import make_pose_animator

    model = trained_from_scratch / "model"
    for name in ("transformer/diffusion_pytorch_model.safetensors", "vae/config.json", "text_encoder/config.json",
                 "tokenizer/tokenizer.json", "pose_encoders.safetensors"):
        assert (model / name).is_file(), name
    vae_config = json.loads((model / "vae" / "config.json").read_text())
    assert vae_config["latents_std"] != [1.0] * 16  # measured on the rendered clips
    report = json.loads((trained_from_scratch / "training.json").read_text())
    assert report["teacher_steps"] == report["student_steps"] == 2
    assert 0.0 <= report["vae_held_out_colour_found"] <= 1.0  # the evaluator, asked of the VAE's reconstructions
    assert set(report["seconds"]) >= {"caption_encoder", "vae", "data", "teacher", "teacher_paths", "student"}
    assert any((trained_from_scratch / "student_run" / "logs").rglob("*"))
    teacher = trained_from_scratch / "teacher" / "transformer" / "diffusion_pytorch_model.safetensors"
    assert teacher.read_bytes() != (model / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()

    pipeline, _ = build_pipeline(load_config("configs/tiny.yaml"), model, "cpu")
    assert pipeline.components.model_dir == model
    world = SyntheticWorld()
    scene = world.held_out_scene(0)
    t2v = np.concatenate([r.frames for r in pipeline.generate(GenerationRequest(scene.caption, num_blocks=1))])
    assert t2v.shape == (9, 64, 96, 3)
    first = render(scene)[0]
    i2v = [r.frames for r in pipeline.generate(GenerationRequest(scene.caption, num_blocks=1,
                                                                 image=Image.fromarray(first)))]
    assert i2v[0].shape == (1, 64, 96, 3)
    figure = world.figure_scene_at(0)
    animator = make_pose_animator(pipeline, None)
    request = animator.request(Image.fromarray(render(figure)[0]), list(pose_frames(figure)[4:]), True,
                               GenerationRequest(figure.caption, num_blocks=1))
    assert sum(len(r.frames) for r in pipeline.generate(request)) == 1 + 12  # the reference, then 3 latents
    assert animator.encoders.path == model / "pose_encoders.safetensors"
    # The app reads the captions with the trained word-level tokenizer, not the random model's bytes.
    encoder = pipeline.components.prompt_encoder
    assert encoder.tokenizer.convert_ids_to_tokens(encoder.tokenize(["A red circle"], "cpu")[0][0, :4].tolist()) \
        == ["a", "red", "circle", "</s>"]


def test_a_second_run_continues_instead_of_starting_over(trained_from_scratch, caplog):
    from training import tiny

    before = (trained_from_scratch / "model" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    with caplog.at_level("INFO"):
        assert tiny.main(["--out", str(trained_from_scratch), "--clips", "12", "--workers", "1", "--cpu",
                          "--skip-evaluation", "--student-steps", "2"]) == 0
    assert (trained_from_scratch / "model" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert not any("caption encoder step" in r.message or "vae step" in r.message for r in caplog.records)


def test_continuing_a_trained_model_carries_every_part_over_to_the_grown_world(tmp_path, caplog):
    """--from --continue: the caption encoder learns the new words, the VAE and the teacher continue from the
    bundle's (the teacher from teacher.safetensors, not from random weights nor from the student), and the
    student is distilled from that continued teacher, not from the bundle's student."""
    import json

    from safetensors.torch import load_file

    from training import tiny

    bundle, out = tiny.BUNDLE, tmp_path / "grown"
    assert tiny.main(["--out", str(out), "--continue"]) == 2  # --continue needs --from
    with caplog.at_level("INFO"):
        assert tiny.main(["--out", str(out), "--from", str(bundle), "--continue", "--clips", "8",
                          "--caption-steps", "4", "--caption-batch", "8", "--vae-steps", "1", "--vae-long-steps", "1",
                          "--vae-batch", "2", "--vae-long-batch", "1", "--teacher-steps", "2", "--student-steps", "2",
                          "--workers", "1", "--cpu", "--skip-evaluation"]) == 0
    # the bundle was itself grown to this world (tests above grow a vocabulary that lacks words): it keeps all
    assert any("0 new" in r.message for r in caplog.records)
    model = out / "model"
    assert "beige" in json.loads((model / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    report = json.loads((out / "training.json").read_text())
    assert set(report["seconds"]) >= {"caption_encoder", "vae", "data", "teacher", "teacher_paths", "student"}

    def distance(a: dict, b: dict) -> float:
        return float(sum((a[k].float() - b[k].float()).norm() for k in b) / sum(b[k].float().norm() for k in b))

    weights = "diffusion_pytorch_model.safetensors"
    shipped_teacher = load_file(str(bundle / tiny.TEACHER_FILE))
    shipped_student = load_file(str(bundle / "transformer" / weights))
    teacher = load_file(str(out / "teacher" / "transformer" / weights))
    student = load_file(str(model / "transformer" / weights))
    assert distance(shipped_teacher, shipped_student) > 0.02  # the control: the two differ (0.029)
    assert distance(teacher, shipped_teacher) < 0.01 and distance(student, teacher) < 0.01
    assert distance(student, shipped_student) > 0.02
    assert distance(load_file(str(model / "vae" / weights)), load_file(str(bundle / "vae" / weights))) < 0.01


def test_the_trained_model_folder_is_required_with_a_clear_message(tmp_path):
    from pipelines.config import load_config
    from pipelines.loading.weights import WeightsError, load_components

    config = load_config("configs/tiny.yaml", **{"weights.bundled_dir": str(tmp_path / "absent")})
    with pytest.raises(WeightsError, match="python -m training.tiny"):
        load_components(config)


def test_the_world_tokenizer_knows_every_caption_word_and_marks_others_unknown():
    from training.caption_encoder import world_tokenizer

    tokenizer, world = world_tokenizer(), SyntheticWorld()
    captions = [world.scene(i).caption for i in range(400)] + [world.held_out_scene(i).caption for i in range(60)]
    unknown = tokenizer.unk_token_id
    assert not [c for c in captions if unknown in tokenizer(c).input_ids]
    ids = tokenizer("A RED circle zooms!").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["a", "red", "circle", "<unk>", "<unk>", "</s>"]
    assert max(len(tokenizer(c).input_ids) for c in captions) <= 48  # configs/tiny.yaml reads 64


def test_every_direction_has_caption_words():
    assert set(DIRECTIONS) <= set(MOTION_PHRASES)
    assert all(len(set(phrases)) == len(phrases) for phrases in MOTION_PHRASES.values())
    assert len(set(itertools.chain(*MOTION_PHRASES.values()))) == sum(map(len, MOTION_PHRASES.values()))


def test_a_time_limited_run_pauses_with_a_checkpoint_and_continues(trained_from_scratch, tmp_path):
    from training import train

    data = trained_from_scratch / "paths"
    weights = trained_from_scratch / "teacher"
    out = tmp_path / "run"
    common = ["--config", "configs/tiny_train.yaml", "--data", str(data), "--out", str(out), "--weights", str(weights),
              "--full", "--pose", "--max-steps", "3", "--cpu"]
    assert train.main([*common, "--max-minutes", "0"]) == 0
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-000001"]
    assert not (out / "generator.safetensors").exists()
    assert train.main([*common, "--resume", "latest"]) == 0
    assert (out / "generator.safetensors").exists()
