"""The reference's recommended defaults: EMA generator weights, and optional prompt extension."""
from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from demo.runtime import load_runtime
from demo.session import SessionControl
from demo.streaming import choose_extension, stream_video
from pipelines.cli import main as cli_main
from pipelines.config import load_config
from pipelines.loading.prompt_extender import ExtenderError, PromptExtender, find_extender_folder
from pipelines.loading.video_io import count_frames
from serving.jobs import StreamJob

from conftest import ROOT
from runtimes import local_runtime
from tiny_checkpoints import write_original_layout, write_self_forcing_checkpoint, write_tiny_causal_lm


def test_self_forcing_config_loads_ema_weights_by_default():
    assert load_config("configs/self_forcing_dmd.yaml").weights.use_ema is True
    assert load_config("configs/self_forcing_dmd.yaml", **{"weights.use_ema": False}).weights.use_ema is False


@pytest.fixture(scope="module")
def ema_weights(tmp_path_factory, tiny_components):
    """A tiny original-layout folder whose checkpoint's 'generator_ema' differs from 'generator' by 0.5,
    and a config that, like self_forcing_dmd.yaml, asks for EMA weights."""
    root = tmp_path_factory.mktemp("ema")
    weights = root / "weights"
    write_original_layout(tiny_components, weights)
    write_self_forcing_checkpoint(tiny_components, weights / "checkpoints" / "self_forcing_dmd.pt", ema_offset=0.5)
    config = OmegaConf.load(ROOT / "configs/tiny.yaml")
    config.weights = {"layout": "auto", "generator_ckpt": "checkpoints/self_forcing_dmd.pt", "use_ema": True}
    OmegaConf.save(config, root / "tiny_ema.yaml")
    return root / "tiny_ema.yaml", weights


@pytest.mark.parametrize("flags,expect_ema", [([], True), (["--use-ema"], True), (["--no-ema"], False)])
def test_app_flags_choose_the_weights_and_the_banner_says_which(ema_weights, tiny_components, flags, expect_ema):
    from app import build_parser

    config, weights = ema_weights
    args = build_parser().parse_args(["--config", str(config), "--weights", str(weights), *flags])
    runtime = load_runtime(args.config, args.weights, "cpu", use_ema=args.use_ema)
    offset = runtime.engine.pipeline.generator.proj_out.weight - tiny_components.generator.proj_out.weight
    assert torch.allclose(offset, torch.full_like(offset, 0.5 if expect_ema else 0.0), atol=1e-6)
    banner = runtime.banner()
    assert ("EMA weights ('generator_ema')" in banner) == expect_ema
    assert ("non-EMA weights ('generator')" in banner) == (not expect_ema)


def test_environment_mirrors_the_ema_flags(monkeypatch):
    from app import build_parser

    monkeypatch.setenv("SF_USE_EMA", "0")
    assert build_parser().parse_args([]).use_ema is False
    assert build_parser().parse_args(["--use-ema"]).use_ema is True
    monkeypatch.delenv("SF_USE_EMA")
    assert build_parser().parse_args([]).use_ema is None  # the config decides


# ---------------------------------------------------------------- prompt extension


@pytest.fixture(scope="module")
def extender_weights(tmp_path_factory):
    weights = tmp_path_factory.mktemp("extender")
    write_tiny_causal_lm(weights / "prompt_extender")
    return weights


class CountingExtender(PromptExtender):
    """The real extender, counting how often the language model actually runs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.runs: list[str] = []

    def _generate(self, prompt, device):
        self.runs.append(prompt)
        return super()._generate(prompt, device)


def test_extender_folder_is_found_in_the_weights_folder(tmp_path, extender_weights):
    assert find_extender_folder(extender_weights) == extender_weights / "prompt_extender"
    other = tmp_path / "w"
    write_tiny_causal_lm(other / "Qwen2.5-0.5B-Instruct")
    (other / "not_a_model").mkdir()
    assert find_extender_folder(other) == other / "Qwen2.5-0.5B-Instruct"
    assert find_extender_folder(tmp_path / "empty") is None and find_extender_folder(None) is None
    assert find_extender_folder(other, "elsewhere") == other / "elsewhere"


def test_extender_is_greedy_and_runs_once_per_distinct_prompt(extender_weights):
    extender = CountingExtender(extender_weights / "prompt_extender", max_new_tokens=24)
    first = extender.extend("a red fox in the snow")
    assert first and first != "a red fox in the snow"
    assert extender.extend("a red fox in the snow") == first
    assert extender.extend("  a red fox in the snow ") == first
    assert extender.runs == ["a red fox in the snow"]
    extender.extend("a blue whale")
    assert len(extender.runs) == 2
    fresh = PromptExtender(extender_weights / "prompt_extender", max_new_tokens=24)
    assert fresh.extend("a red fox in the snow") == first  # deterministic across loads


class RecordingEncoder:
    """Wraps the prompt encoder to record which prompts the generator is conditioned on."""

    def __init__(self, encoder) -> None:
        self.encoder, self.prompts = encoder, []

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode(self, prompt, device=None):
        self.prompts.append(prompt)
        return self.encoder.encode(prompt, device)


@pytest.fixture()
def extending_runtime(tiny_pipeline, tiny_config, extender_weights, monkeypatch):
    runtime = local_runtime(tiny_config, tiny_pipeline,
                      extender=CountingExtender(extender_weights / "prompt_extender", max_new_tokens=24))
    recorder = RecordingEncoder(tiny_pipeline.prompt_encoder)
    monkeypatch.setattr(tiny_pipeline, "prompt_encoder", recorder)
    return runtime, recorder


def _run(runtime, session, prompt, extend=True, edited=""):
    job = choose_extension(runtime, session, StreamJob(prompt=prompt, num_blocks=1), extend, edited)
    return list(stream_video(runtime, session, job))


def _boxes(updates) -> list[int]:
    """Indices of the updates that set the extended-prompt box."""
    return [i for i, update in enumerate(updates) if isinstance(update[5], str)]


def test_generator_receives_the_extended_prompt_and_the_ui_shows_it(extending_runtime):
    runtime, recorder = extending_runtime
    session = SessionControl()
    updates = _run(runtime, session, "a kite over hills")
    extended = runtime.engine.extender.extend("a kite over hills")
    [box] = _boxes(updates)
    first_segment = next(i for i, update in enumerate(updates) if isinstance(update[0], str))
    assert updates[box][5] == extended and box < first_segment  # the box shows the text before the first block
    assert recorder.prompts == [extended]
    assert updates[-1][2].startswith("Done.")


def test_edited_extension_is_used_and_a_new_prompt_is_extended_afresh(extending_runtime):
    runtime, recorder = extending_runtime
    session = SessionControl()
    _run(runtime, session, "a kite over hills")
    updates = _run(runtime, session, "a kite over hills", edited="a kite, edited by hand")
    assert recorder.prompts[-1] == "a kite, edited by hand" and runtime.engine.extender.runs == ["a kite over hills"]
    assert not _boxes(updates)  # the box keeps the user's text
    _run(runtime, session, "a boat", edited="a kite, edited by hand")  # stale text of another prompt
    assert recorder.prompts[-1] == runtime.engine.extender.extend("a boat")
    _run(runtime, session, "a boat", extend=False)
    assert recorder.prompts[-1] == "a boat"


def test_broken_extender_leaves_the_prompt_and_says_so(tiny_pipeline, tiny_config, tmp_path, monkeypatch, caplog):
    broken = tmp_path / "prompt_extender"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(ExtenderError, match=str(broken)):
        PromptExtender(broken).extend("x")
    with pytest.raises(ExtenderError, match="config.json does not exist"):
        PromptExtender(tmp_path / "missing").extend("x")
    runtime = local_runtime(tiny_config, tiny_pipeline, extender=PromptExtender(broken))
    recorder = RecordingEncoder(tiny_pipeline.prompt_encoder)
    monkeypatch.setattr(tiny_pipeline, "prompt_encoder", recorder)
    caplog.set_level(logging.INFO)
    updates = _run(runtime, SessionControl(), "a lamp")
    assert recorder.prompts == ["a lamp"]
    assert "prompt extension failed" in updates[-1][2] and updates[-1][2].startswith("Done.")
    assert "Traceback" not in caplog.text


def test_without_extender_the_option_is_disabled_with_a_reason(tiny_config, extender_weights):
    bare = load_runtime("configs/tiny.yaml", None, "cpu")
    assert not bare.info.extender and "No prompt extender" in bare.info.extender_note
    found = load_runtime("configs/tiny.yaml", str(extender_weights), "cpu")
    assert found.info.extender and "prompt_extender" in found.info.extender_note


def test_cli_extend_prompt(tmp_path, extender_weights, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "x.mp4"
    assert cli_main(["--prompt", "a kite", "--blocks", "1", "--device", "cpu", "--weights", str(extender_weights),
                     "--extend-prompt", "--out", str(out)]) == 0
    assert "extended prompt:" in caplog.text and count_frames(out) == 9
    caplog.clear()
    assert cli_main(["--prompt", "a kite", "--blocks", "1", "--device", "cpu", "--extend-prompt",
                     "--out", str(out)]) == 0
    assert "no prompt extender found" in caplog.text and count_frames(out) == 9
