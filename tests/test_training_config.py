"""Typed training and fine-tuning YAMLs (training/config.py): wrong keys stop at load with their name, the
fine-tuning command picks its stages from the model config, and bad inputs end in one clear line."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from training import finetune, train
from training.config import TrainingConfigError, load_finetune_config, load_training_config

ROOT = Path(__file__).resolve().parent.parent


def test_every_shipped_training_yaml_loads():
    for name in ("train_lora", "tiny_teacher", "tiny_train", "tiny_lora", "finetune_lora"):
        assert load_training_config(ROOT / "configs" / f"{name}.yaml").max_steps > 0
    tiny = load_training_config(ROOT / "configs" / "tiny_lora.yaml")  # a fine-tuning YAML: its single stage
    assert tiny.model_config == "configs/tiny.yaml" and tiny.lora.rank == 16 and tiny.max_steps == 400


def test_a_misspelt_key_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    OmegaConf.save(OmegaConf.create({"lora": {"rnk": 4}}), path)
    with pytest.raises(TrainingConfigError, match=r"bad.yaml: Key 'rnk' not in 'LoraSettings'"):
        load_training_config(path)
    finetune_yaml = tmp_path / "bad_finetune.yaml"
    OmegaConf.save(OmegaConf.create({"model_config": "configs/tiny.yaml", "student": {"max_stpes": 3}}),
                   finetune_yaml)
    with pytest.raises(TrainingConfigError, match=r"bad_finetune.yaml: .*max_stpes"):
        load_finetune_config(finetune_yaml)
    with pytest.raises(TrainingConfigError, match="loss must be 'flow' or 'ode_regression'"):
        load_training_config(None, {"loss": "dmd"})


def test_the_stages_follow_the_model_config(tmp_path):
    tiny = finetune.Finetune(load_finetune_config(ROOT / "configs" / "tiny_lora.yaml"), tmp_path, tmp_path)
    assert [(s.name, s.config.loss, Path(s.config.model_config).name) for s in tiny.stages] == [
        ("teacher", "flow", "tiny_multistep.yaml"), ("student", "ode_regression", "tiny.yaml")]
    assert tiny.stages[1].data == tmp_path / "paths"
    multistep = OmegaConf.create({"model_config": "configs/tiny_multistep.yaml"})
    OmegaConf.save(multistep, tmp_path / "multistep.yaml")
    plain = finetune.Finetune(load_finetune_config(tmp_path / "multistep.yaml"), tmp_path, tmp_path)
    assert [(s.name, s.config.loss) for s in plain.stages] == [("student", "flow")]


def test_a_distilled_model_without_a_teacher_is_refused_in_one_line(tmp_path, caplog):
    OmegaConf.save(OmegaConf.create({"model_config": "configs/tiny_random.yaml"}), tmp_path / "random.yaml")
    with caplog.at_level(logging.ERROR):
        assert finetune.main(["--config", str(tmp_path / "random.yaml"), "--data", str(tmp_path),
                              "--out", str(tmp_path / "out")]) == 2
    [message] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "few-step (distilled) model with no `teacher:`" in message and "transfer: flow" in message


def test_missing_data_ends_training_with_one_line(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert train.main(["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out"), "--cpu"]) == 2
    [message] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "manifest.jsonl lists no clips" in message and "training.prepare" in message
