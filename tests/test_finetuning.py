"""Fine-tuning on the tiny model: data preparation, training, resumption, LoRAs in every format, the app."""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from pipelines.builder import build_pipeline
from pipelines.config import load_config
from pipelines.core import GenerationRequest, RequestError, StreamingVideoPipeline
from pipelines.loading.lora import LoraChoice, LoraError, read_lora
from pipelines.loading.video_io import count_frames, write_video
from pipelines.loading.weights import load_components
from pipelines.memory.planner import apply_profile
from pipelines.memory.profiles import PROFILES
from training.config import load_training_config
from training.data import CachedClips, read_manifest
from training.objective import FlowObjective, noisy_latents, velocity_target
from training.prepare import prepare
from training.train import Trainer, TrainRun, build_parser

from app_server import AppServer

ROOT = Path(__file__).resolve().parent.parent
TINY_TRAIN = {"model_config": "configs/tiny.yaml", "max_steps": 30, "learning_rate": 3e-3, "warmup_steps": 1,
              "lr_schedule": "constant", "batch_size": 2, "lora": {"rank": 4, "alpha": 4},
              "checkpoint_every": 0, "validate_every": 0, "log_every": 1,
              "validation": {"prompts": ["a red square"], "blocks": 1, "seed": 1}}


def _moving_square(frames: int, colour: tuple[int, int, int], size=(64, 96)) -> np.ndarray:
    video = np.full((frames, *size, 3), 30, dtype=np.uint8)
    for t in range(frames):
        x = (3 * t) % (size[1] - 16)
        video[t, 24:40, x:x + 16] = colour
    return video


@pytest.fixture(scope="module")
def source_videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    write_video(folder / "red.mp4", [_moving_square(80, (230, 30, 30))], 16)  # 80 frames: 2 clips of 33
    (folder / "red.txt").write_text("a red square moves to the right")
    write_video(folder / "blue.mp4", [_moving_square(40, (30, 30, 230))], 24)  # 24 fps: resampled to 26 frames
    (folder / "nested").mkdir()
    write_video(folder / "nested" / "green.mp4", [_moving_square(50, (30, 230, 30))], 16)
    write_video(folder / "short.mp4", [_moving_square(10, (200, 200, 30))], 16)
    (folder / "short.txt").write_text("too short to cut a clip")
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video" * 4)
    (folder / "broken.txt").write_text("unreadable")
    write_video(folder / "uncaptioned.mp4", [_moving_square(40, (90, 90, 90))], 16)
    with (folder / "captions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "caption"])
        writer.writerow(["nested/green.mp4", "a green square moves to the right"])
        writer.writerow(["blue.mp4", "a blue square moves to the right"])
    return folder


@pytest.fixture(scope="module")
def tiny_build():
    pipeline, _ = build_pipeline(load_config("configs/tiny.yaml"), None, "cpu")
    return pipeline


@pytest.fixture(scope="module")
def prepared(source_videos, tiny_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    with torch.no_grad():
        prepare(source_videos, out, tiny_build, 33, 33, source_videos / "captions.csv", clips_per_shard=2)
    return out


def test_prepare_caches_clips_skips_bad_videos_and_resumes(source_videos, tiny_build, prepared, tmp_path, caplog):
    records = read_manifest(prepared)
    assert sorted(r.clip_id for r in records) == ["green-00000", "red-00000", "red-00033"]
    assert {r.caption for r in records} >= {"a red square moves to the right", "a green square moves to the right"}
    assert [r.start_s for r in records if r.clip_id.startswith("red")] == [0.0, 33 / 16]
    assert len(list(prepared.glob("shard-*.safetensors"))) == 2  # 2 clips per shard
    clip = CachedClips(prepared)[0]
    assert clip["latents"].shape == (16, 9, 8, 12)  # 33 frames -> 9 latent frames at 64x96 / 8
    text = tiny_build.config.text_encoder
    assert clip["prompt"].shape[1] == text["d_model"] and 0 < clip["prompt"].shape[0] <= text["text_len"]
    # a fresh run into a new folder names each skipped file once
    caplog.set_level(logging.WARNING)
    fresh = tmp_path / "fresh"
    with torch.no_grad():
        added = prepare(source_videos, fresh, tiny_build, 33, 33, source_videos / "captions.csv")
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert added == 3 and len(skipped) == 4, skipped
    for name, reason in (("broken.mp4", "unreadable"), ("short.mp4", "too short"), ("uncaptioned.mp4", "no caption"),
                         ("blue.mp4", "too short")):
        assert any(name in line and reason in line for line in skipped), (name, skipped)
    with torch.no_grad():
        assert prepare(source_videos, fresh, tiny_build, 33, 33, source_videos / "captions.csv") == 0
    assert len(read_manifest(fresh)) == 3


def test_velocity_target_and_noisy_latents_by_hand():
    x0 = torch.tensor([1.0, -2.0]).reshape(1, 1, 2, 1, 1)
    noise = torch.tensor([0.5, 3.0]).reshape(1, 1, 2, 1, 1)
    sigma = torch.tensor([[0.25, 1.0]])
    assert torch.equal(velocity_target(x0, noise).flatten(), torch.tensor([-0.5, 5.0]))
    # (1 - 0.25) * 1 + 0.25 * 0.5 = 0.875 ; (1 - 1) * -2 + 1 * 3 = 3
    assert torch.allclose(noisy_latents(x0, noise, sigma).flatten(), torch.tensor([0.875, 3.0]))
    # x_t - sigma * v recovers x0: what the few-step sampler's to_x0 computes
    assert torch.allclose(noisy_latents(x0, noise, sigma) - sigma[:, None, :, None, None] * velocity_target(x0, noise), x0)
    objective = FlowObjective(shift=5.0)
    assert torch.allclose(objective.shifted(torch.tensor([0.5])), torch.tensor([5 * 0.5 / (1 + 4 * 0.5)]))
    sigma, in_loss = FlowObjective(teacher_forcing=1.0).block_sigmas(4, 3, torch.Generator().manual_seed(0))
    assert (sigma[:, 0] == 0).all() and not in_loss[:, 0].any() and in_loss[:, -1].all()


def _trainer(tmp_path: Path, data: Path, name: str, *flags: str, **overrides) -> Trainer:
    config = tmp_path / f"{name}.yaml"
    OmegaConf.save(OmegaConf.create({**TINY_TRAIN, **overrides}), config)
    args = build_parser().parse_args(["--config", str(config), "--data", str(data), "--out", str(tmp_path / name),
                                      "--cpu", *flags])
    return Trainer(TrainRun.from_args(args), load_training_config(config))


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    trainer = _trainer(folder, prepared, "run")
    losses = trainer.train()
    return trainer, losses, folder / "run" / "lora.safetensors"


def test_thirty_steps_lower_the_loss_and_write_an_adapter(trained):
    trainer, losses, adapter = trained
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    state = load_file(str(adapter))
    assert all(k.startswith("transformer.blocks.") and (".lora_A." in k or ".lora_B." in k) for k in state)
    assert (trainer.run.out / "logs" / "metrics.csv").is_file()


def test_resume_reproduces_the_next_steps_exactly(prepared, tmp_path):
    settings = dict(max_steps=4, checkpoint_every=2, lora={"rank": 4, "alpha": 4, "dropout": 0.1})
    straight = _trainer(tmp_path, prepared, "straight", **settings).train()
    resumed_trainer = _trainer(tmp_path, prepared, "straight", **settings)
    resumed_trainer.start_step = resumed_trainer.load_checkpoint(tmp_path / "straight" / "checkpoints" / "step-000002")
    resumed = resumed_trainer.train()
    assert resumed == straight[2:]
    other_seed = _trainer(tmp_path, prepared, "other", **settings, seed=1).train()
    assert other_seed[0] != straight[0]


def _video(pipeline, **request) -> np.ndarray:
    request = GenerationRequest("a red square moves to the right", seed=3, num_blocks=2, **request)
    return np.concatenate([r.frames for r in pipeline.generate(request)])


def test_lora_scale_zero_one_and_the_trained_model(trained, tiny_components, tiny_config):
    trainer, _, adapter = trained
    pipeline = StreamingVideoPipeline(load_components(tiny_config), tiny_config)
    base = _video(pipeline)
    assert np.array_equal(_video(pipeline, loras=(LoraChoice(str(adapter), 0.0),)), base)
    tuned = _video(pipeline, loras=(LoraChoice(str(adapter), 1.0),))
    assert not np.array_equal(tuned, base)
    assert np.array_equal(_video(pipeline), base)  # the base weights come back exactly
    assert np.array_equal(_video(pipeline, loras=(LoraChoice(str(adapter), 1.0),)), tuned)  # save -> load: same
    in_memory = StreamingVideoPipeline(dataclasses.replace(tiny_components, generator=trainer.step_module_unwrapped.generator),
                                       tiny_config)
    trained_video = _video(in_memory)
    assert np.abs(trained_video.astype(int) - tuned.astype(int)).max() <= 2  # merged == the peft layers, to rounding


ORIGINAL_NAMES = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                  "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                  "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
                  "ffn.net.2": "ffn.2"}


def _as_format(adapter: Path, folder: Path, form: str) -> Path:
    """The same LoRA (alpha = rank, so no extra scale) saved in another published naming."""
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(adapter)).items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, kind = key.rsplit(".lora_", 1)
        block, name = module.split(".", 2)[1], module.split(".", 2)[2]
        if form == "peft":
            out[f"base_model.model.{key}"] = value
        elif form == "longlive":
            suffix = "lora_A.weight" if kind.startswith("A") else "lora_B.weight"
            out[f"base_model.model.blocks.{block}.{ORIGINAL_NAMES[name]}.{suffix}"] = value
        elif form == "diffusers":
            out[f"transformer.{key}"] = value
        else:
            original = f"blocks.{block}.{ORIGINAL_NAMES[name]}"
            suffix = "lora_down.weight" if kind.startswith("A") else "lora_up.weight"
            prefix = "diffusion_model." + original if form == "comfy" else "lora_unet_" + original.replace(".", "_")
            out[f"{prefix}.{suffix}"] = value
            out[f"{prefix}.alpha"] = torch.tensor(float(value.shape[0] if kind.startswith("A") else value.shape[1]))
    if form == "longlive":  # a torch file holding {'generator_lora': peft state of the original Wan model}
        path = folder / "lora.pt"
        torch.save({"generator_lora": out}, path)
        return path
    path = folder / f"{form}.safetensors"
    save_file(out, str(path))
    return path


@pytest.mark.parametrize("form", ["peft", "diffusers", "comfy", "musubi", "longlive"])
def test_every_accepted_format_gives_the_same_video(trained, tiny_config, tmp_path, form):
    _, _, adapter = trained
    pipeline = StreamingVideoPipeline(load_components(tiny_config), tiny_config)
    own = _video(pipeline, loras=(LoraChoice(str(adapter)),))
    other = _as_format(adapter, tmp_path, form)
    assert np.array_equal(_video(pipeline, loras=(LoraChoice(str(other)),)), own), form


def test_streamed_weights_with_a_lora_equal_resident(trained, tiny_config):
    _, _, adapter = trained
    resident = StreamingVideoPipeline(load_components(tiny_config), tiny_config)
    streamed_components = load_components(tiny_config)
    apply_profile(streamed_components, PROFILES["low"], "cpu")
    streamed = StreamingVideoPipeline(streamed_components, tiny_config)
    choice = (LoraChoice(str(adapter), 1.5),)
    assert np.array_equal(_video(streamed, loras=choice), _video(resident, loras=choice))
    assert np.array_equal(_video(streamed), _video(resident))


def test_changing_the_lora_keeps_the_weights_in_place_and_compiled_graphs(trained, tiny_config):
    from torch._dynamo.utils import counters

    _, _, adapter = trained
    components = load_components(tiny_config)
    pipeline = StreamingVideoPipeline(components, tiny_config)
    components.generator.compile_blocks(backend="eager", dynamic=False)
    torch._dynamo.reset()
    counters.clear()
    pointers = [p.data_ptr() for p in components.generator.parameters()]
    _video(pipeline, loras=(LoraChoice(str(adapter), 0.5),))
    graphs = counters["stats"]["unique_graphs"]
    for strength in (1.0, 2.0, 0.0):
        _video(pipeline, loras=(LoraChoice(str(adapter), strength),))
    assert counters["stats"]["unique_graphs"] == graphs > 0  # no recompilation for another LoRA or strength
    assert [p.data_ptr() for p in components.generator.parameters()] == pointers


def test_bad_lora_files_are_named(tmp_path, tiny_pipeline):
    big = tmp_path / "wan14b.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 5120),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(5120, 4),
               "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4.0)}, str(big))
    with pytest.raises(LoraError, match=r"wan14b.safetensors was made for another base model.*blocks.0.attn1.to_q"):
        read_lora(big, tiny_pipeline.generator)
    strange = tmp_path / "strange.safetensors"
    save_file({"unet.down_blocks.0.lora_A.weight": torch.zeros(4, 64), "vae.scale": torch.zeros(1)}, str(strange))
    with pytest.raises(LoraError, match=r"strange.safetensors is not a LoRA for this Wan generator.*unet.down_blocks"):
        read_lora(strange, tiny_pipeline.generator)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(LoraError, match="Could not read .*junk.safetensors"):
        read_lora(tmp_path / "junk.safetensors", tiny_pipeline.generator)
    with pytest.raises(RequestError, match="wan14b"):
        list(tiny_pipeline.generate(GenerationRequest("x", loras=(LoraChoice(str(big)),))))
    assert LoraChoice.parse("a/b.safetensors:0.5") == LoraChoice("a/b.safetensors", 0.5)
    assert LoraChoice.parse("C:/loras/x.safetensors") == LoraChoice("C:/loras/x.safetensors", 1.0)


def test_cli_lora(trained, tmp_path):
    _, _, adapter = trained
    out = tmp_path / "lora.mp4"
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "--prompt", "a red square", "--blocks", "1",
                             "--device", "cpu", "--lora", f"{adapter}:0.8", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert count_frames(out) == 9


def test_two_process_training_saves_one_adapter(prepared, tmp_path):
    config = tmp_path / "ddp.yaml"
    OmegaConf.save(OmegaConf.create({**TINY_TRAIN, "max_steps": 3, "batch_size": 1}), config)
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                             "-m", "training.train", "--config", str(config), "--data", str(prepared),
                             "--out", str(tmp_path / "ddp"), "--cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "ddp").glob("*.safetensors")) == ["lora.safetensors"]
    rows = (tmp_path / "ddp" / "logs" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4  # header + 3 steps, written once (main process)


def test_app_lora_choice_changes_the_video_and_bad_files_are_refused(trained, tmp_path):
    _, _, adapter = trained
    weights = tmp_path / "weights"
    (weights / "loras").mkdir(parents=True)
    (weights / "loras" / "squares.safetensors").write_bytes(adapter.read_bytes())
    (weights / "loras" / "broken.safetensors").write_bytes(b"not a lora")
    server = AppServer("--weights", str(weights), "--outputs", str(tmp_path / "outputs"))
    try:
        client = Client(server.url, verbose=False)
        args = ("a red square", "", 5, False, 1, 16, "96x64", False, "")
        plain = client.predict(*args, "none", 1.0, api_name="/text_to_video")
        tuned = client.predict(*args, "squares.safetensors", 1.0, api_name="/text_to_video")
        assert Path(plain[3]).read_bytes() != Path(tuned[3]).read_bytes()
        with pytest.raises(AppError, match="broken.safetensors"):
            client.predict(*args, "broken.safetensors", 1.0, api_name="/text_to_video")
        with pytest.raises(AppError, match="No LoRA named"):
            client.predict(*args, "../../etc/passwd", 1.0, api_name="/text_to_video")
        with pytest.raises(AppError, match="LoRA strength must be between 0 and 2"):
            client.predict(*args, "squares.safetensors", 5.0, api_name="/text_to_video")
        again = client.predict(*args, "none", 1.0, api_name="/text_to_video")
        assert Path(again[3]).read_bytes() == Path(plain[3]).read_bytes()
    finally:
        server.stop()
    assert json.loads((tmp_path / "outputs" / "metrics.jsonl").read_text().splitlines()[-1])["blocks_done"] == 1


def _square_detector(frame: np.ndarray):
    """A stand-in for DWPose: a 'body' whose neck sits on the bright square of the frame."""
    from pipelines.pose.draw import PoseFrame

    bright = np.argwhere(frame.max(axis=2) > 150)
    y, x = (bright.mean(axis=0) / frame.shape[:2]) if len(bright) else (0.5, 0.5)
    points = np.zeros((18, 3))
    for index, (dx, dy) in {0: (0, -0.2), 1: (0, 0), 8: (-0.1, 0.3), 11: (0.1, 0.3)}.items():
        points[index] = (x + dx, y + dy, 1.0)
    return PoseFrame(bodies=[points])


def test_pose_training_writes_encoders_the_pose_tab_loads(source_videos, tiny_build, tmp_path):
    from pipelines.pose.condition import LazyPoseEncoders, PoseEncoders

    data = tmp_path / "pose_data"
    with torch.no_grad():  # 37 frames: one reference latent + 3 blocks of 3 latent frames
        prepare(source_videos, data, tiny_build, 37, 37, source_videos / "captions.csv", _square_detector)
    clip = CachedClips(data)[0]
    assert clip["pose"].shape == (33, 64, 96, 3) and clip["reference_pose"].shape == (64, 96, 3)
    assert clip["pose"].max() > 0  # a skeleton was drawn
    # start from 'UniAnimate-like' encoders of another width: a pose_proj maps them to the model width
    wide = PoseEncoders(128)
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(tmp_path / "wide.safetensors"))
    trainer = _trainer(tmp_path, data, "pose", "--pose", max_steps=3, batch_size=1,
                       pose={"init": str(tmp_path / "wide.safetensors")})
    losses = trainer.train()
    assert len(losses) == 3 and all(np.isfinite(losses))
    saved = tmp_path / "pose" / "checkpoints" / "pose_encoders.safetensors"
    state = load_file(str(saved))
    dim = tiny_build.generator.config.dim
    assert state["pose_proj.weight"].shape == (dim, 128)
    assert not torch.equal(state["dwpose_embedding.0.weight"], wide.state_dict()["dwpose_embedding.0.weight"])
    encoders = LazyPoseEncoders(dim, saved, "cpu", torch.float32).get()
    assert encoders.pose_proj is not None
    tokens = encoders.pose_tokens(clip["pose"].numpy())
    assert tokens.shape == (1, 9 * 24, dim)  # 9 latent frames of 4x6 tokens at the model width
    assert (tmp_path / "pose" / "lora.safetensors").is_file()


def test_full_training_writes_a_generator_the_app_loads(prepared, tmp_path, tiny_components):
    trainer = _trainer(tmp_path, prepared, "full", "--full", max_steps=2, learning_rate=1e-3)
    trainer.train()
    saved = tmp_path / "full" / "generator.safetensors"
    weights = tmp_path / "weights"
    from tiny_checkpoints import write_original_layout
    write_original_layout(tiny_components, weights)
    (weights / "checkpoints" / "mine.safetensors").write_bytes(saved.read_bytes())
    config = OmegaConf.load(ROOT / "configs/tiny.yaml")
    config.weights = {"layout": "auto", "generator_ckpt": "checkpoints/mine.safetensors"}
    OmegaConf.save(config, tmp_path / "mine.yaml")
    loaded = load_components(load_config(tmp_path / "mine.yaml"), weights)
    trained = trainer.step_module_unwrapped.generator.state_dict()
    assert all(torch.equal(loaded.generator.state_dict()[k], trained[k].float()) for k in trained)
    assert not torch.equal(loaded.generator.proj_out.weight, tiny_components.generator.proj_out.weight)
