"""The weights inspector on tiny folders in every layout, supported and not."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from demo.runtime import load_runtime
from pipelines.weights_inspector import TransformerShape, inspect_folder, main, vram_by_profile

from tiny_checkpoints import write_diffusers_layout, write_original_layout, write_tiny_causal_lm

ROOT = Path(__file__).resolve().parent.parent


def _finding(report, path: str):
    matches = [f for f in report.findings if f.path == path]
    assert matches, [f.path for f in report.findings]
    return matches[0]


def _original_config_only(folder: Path, dim: int, layers: int, in_dim: int, model_type: str) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": dim, "num_layers": layers,
                                                    "in_dim": in_dim, "model_type": model_type, "ffn_dim": 4 * dim}))
    (folder / "Wan2.1_VAE.pth").write_bytes(b"")


def _diffusers_config_only(folder: Path, heads: int, layers: int, in_channels: int, index: dict) -> None:
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "transformer" / "config.json").write_text(json.dumps({
        "_class_name": "WanTransformer3DModel", "num_attention_heads": heads, "attention_head_dim": 128,
        "num_layers": layers, "in_channels": in_channels}))


def test_runnable_original_layout(tmp_path, tiny_components):
    write_original_layout(tiny_components, tmp_path)
    report = inspect_folder(tmp_path)
    base = _finding(report, "wan_models/Wan2.1-T2V-1.3B")
    assert base.supported and not base.missing and "original Wan layout" in base.kind
    generator = _finding(report, "checkpoints/self_forcing_dmd.pt")
    assert generator.supported and generator.config == "configs/tiny.yaml"
    assert "'generator' and 'generator_ema'" in generator.detail
    assert set(generator.vram_gib) == {"high", "medium", "low"}
    assert report.verdict() == f"Runs with: python app.py --config configs/tiny.yaml --weights {tmp_path}"


def test_runnable_diffusers_layout_and_missing_pieces(tmp_path, tiny_components):
    write_diffusers_layout(tiny_components, tmp_path)
    report = inspect_folder(tmp_path)
    assert "diffusers layout (WanPipeline)" in _finding(report, "Wan2.1-T2V-1.3B-Diffusers").kind
    assert report.runnable
    import shutil
    shutil.rmtree(tmp_path / "Wan2.1-T2V-1.3B-Diffusers" / "vae")
    report = inspect_folder(tmp_path)
    assert any("vae/" in m for m in _finding(report, "Wan2.1-T2V-1.3B-Diffusers").missing)
    generator = _finding(report, "checkpoints/self_forcing_dmd.pt")
    assert generator.missing and "Wan-AI/Wan2.1-T2V-1.3B" in generator.missing[0]
    assert report.verdict().startswith("Cannot run")


def test_public_wan_models_are_named_and_unsupported_ones_say_why(tmp_path):
    _original_config_only(tmp_path / "Wan2.1-T2V-14B", 5120, 40, 16, "t2v")
    _original_config_only(tmp_path / "Wan2.1-I2V-14B-480P", 5120, 40, 36, "i2v")
    _diffusers_config_only(tmp_path / "Wan2.2-TI2V-5B-Diffusers", 24, 30, 48,
                           {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]})
    _diffusers_config_only(tmp_path / "Wan2.2-T2V-A14B-Diffusers", 40, 40, 16,
                           {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
                            "transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875})
    _original_config_only(tmp_path / "Wan2.1-T2V-1.3B", 1536, 30, 16, "t2v")
    report = inspect_folder(tmp_path)
    t2v14 = _finding(report, "Wan2.1-T2V-14B")
    assert t2v14.kind.startswith("Wan2.1 T2V 14B") and not t2v14.supported and "14B" in t2v14.detail
    i2v = _finding(report, "Wan2.1-I2V-14B-480P")
    assert i2v.kind.startswith("Wan2.1 I2V 14B") and not i2v.supported
    ti2v = _finding(report, "Wan2.2-TI2V-5B-Diffusers")
    assert ti2v.kind.startswith("Wan2.2 TI2V 5B") and not ti2v.supported and "48 latent channels" in ti2v.detail
    a14b = _finding(report, "Wan2.2-T2V-A14B-Diffusers")
    assert "transformer_2" in a14b.kind and "0.875" in a14b.kind and not a14b.supported
    small = _finding(report, "Wan2.1-T2V-1.3B")
    assert small.kind.startswith("Wan2.1 T2V 1.3B") and small.supported and small.config == "configs/self_forcing_dmd.yaml"
    assert any("models_t5_umt5-xxl-enc-bf16.pth" in m for m in small.missing)
    assert report.verdict().startswith("Cannot run")


def _lora(path: Path, width: int, original_names: bool) -> None:
    if original_names:
        state = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, width),
                 "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(width, 4),
                 "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4.0)}
    else:
        state = {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, width),
                 "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(width, 4)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def test_loras_pose_encoders_dwpose_and_tiny_decoders(tmp_path):
    _lora(tmp_path / "loras" / "claps.safetensors", 1536, original_names=False)
    _lora(tmp_path / "loras" / "comfy.safetensors", 1536, original_names=True)
    _lora(tmp_path / "loras" / "big.safetensors", 5120, original_names=True)
    (tmp_path / "checkpoints").mkdir()
    save_file({"dwpose_embedding.0.weight": torch.zeros(16, 3, 1, 1, 1),
               "dwpose_embedding.2.weight": torch.zeros(5120, 16, 1, 1, 1),
               "randomref_embedding_pose.0.weight": torch.zeros(16, 3, 1, 1)},
              str(tmp_path / "checkpoints" / "unianimate.safetensors"))
    (tmp_path / "dwpose").mkdir()
    (tmp_path / "dwpose" / "yolox_l.onnx").write_bytes(b"onnx")
    torch.save({"encoder.0.weight": torch.zeros(8, 3, 3, 3), "decoder.0.weight": torch.zeros(3, 8, 3, 3)},
               tmp_path / "taew2_1.pth")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    write_tiny_causal_lm(tmp_path / "prompt_extender")
    report = inspect_folder(tmp_path)
    peft = _finding(report, "loras/claps.safetensors")
    assert peft.supported and "Wan2.1 1.3B" in peft.kind and "rank 4" in peft.kind and "peft" in peft.kind
    comfy = _finding(report, "loras/comfy.safetensors")
    assert comfy.supported and "ComfyUI" in comfy.kind
    big = _finding(report, "loras/big.safetensors")
    assert not big.supported and "14B" in big.kind and "another base model" in big.detail
    pose = _finding(report, "checkpoints/unianimate.safetensors")
    assert not pose.supported and "width 5120" in pose.kind
    dwpose = _finding(report, "dwpose")
    assert dwpose.missing == ["dwpose/dw-ll_ucoco_384.onnx (from yzd-v/DWPose)"]
    assert not _finding(report, "taew2_1.pth").supported
    assert _finding(report, "broken.safetensors").kind == "unreadable file"
    assert _finding(report, "prompt_extender").supported


def test_vram_estimate_of_the_real_model_matches_the_measured_peak():
    """Shapes of Wan2.1-T2V-1.3B, UMT5-XXL (5.68 B) and the Wan VAE (127 M): the H100 measured 23.4 GiB (high),
    13.6 GiB (medium) (bench/results/h100_memory.json); low keeps the full 21-frame KV cache (5.6 GiB) here."""
    from pipelines.config import load_config

    shape = TransformerShape(dim=1536, layers=30, in_dim=16, ffn_dim=8960, params=1_418_996_800,
                             block_params=45_606_016)
    vram = vram_by_profile(shape, load_config("configs/self_forcing_dmd.yaml"), text_encoder_params=5_680_910_336,
                           vae_params=126_892_531)
    assert vram["high"] > vram["medium"] > vram["low"]
    assert 21 < vram["high"] < 26 and 12 < vram["medium"] < 16 and 9 < vram["low"] < 12
    assert TransformerShape(5120, 40, 16, 0, 0, 0).name == "Wan2.1 T2V 14B"


def test_cli_and_app_banner(tmp_path, tiny_components, capsys):
    write_original_layout(tiny_components, tmp_path)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "OK checkpoints/self_forcing_dmd.pt" in out and "Runs with:" in out
    assert main([str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"].startswith("Runs with") and len(data["findings"]) == 2
    assert main([str(tmp_path / "nope")]) == 2
    runtime = load_runtime("configs/self_forcing_dmd.yaml", str(tmp_path), "cpu")
    assert runtime.engine.pipeline is None  # the real config cannot load tiny weights ...
    assert "Runs with: python app.py --config configs/tiny.yaml" in runtime.banner()  # ... the inspector says what does


@pytest.mark.parametrize("empty", [True, False])
def test_empty_or_foreign_folder(tmp_path, empty):
    if not empty:
        (tmp_path / "notes.txt").write_text("hello")
    report = inspect_folder(tmp_path)
    assert report.findings == [] and report.verdict().startswith("Cannot run")
    assert "Wan-AI/Wan2.1-T2V-1.3B" in report.verdict() and "gdhe17/Self-Forcing" in report.verdict()


def test_the_embedded_models_folder_is_reported_runnable():
    """The folder the app runs by default: the verdict agrees with its one finding."""
    report = inspect_folder(ROOT / "assets" / "tiny_shapes")
    assert [f.config for f in report.runnable] == ["configs/tiny.yaml"]
    assert report.verdict().startswith("Runs with: python app.py --config configs/tiny.yaml")


def test_the_inspector_answers_before_heavy_imports():
    """A wrong folder is said at once: the inspector's module imports neither torch nor diffusers."""
    code = "import sys, pipelines.weights_inspector; print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    missing = subprocess.run([sys.executable, "-m", "pipelines.weights_inspector", "/no/such/folder"], cwd=ROOT,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "is not a folder" in missing.stderr
