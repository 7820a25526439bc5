"""Which fine-tuning settings keep most of the new concept and of the old world: one `training.finetune` run per
variant of a fine-tuning YAML, each scored like tests/test_finetune_distilled.py (training.scorecard.finetune_scores).

A variant is NAME or NAME:key=value,key=value (OmegaConf dot-list overrides of the YAML). Variants that change
only the student, the paths or the preserve pairs reuse the first variant's teacher stage. Results go to
OUT/sweep.json (one entry per variant, written as each finishes, so a rerun skips finished ones).

    python -m training.examples --concept --out my_clips && python -m training.prepare --videos my_clips --out data
    python bench/sweep_finetune.py --data data --out sweep base student600:student.max_steps=600
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omegaconf import OmegaConf  # noqa: E402

from pipelines.builder import build_pipeline, default_device  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from training import finetune  # noqa: E402
from training.scorecard import finetune_scores  # noqa: E402

STUDENT_SIDE = ("student.", "paths.", "preserve.")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition(":")
    return name, [item for item in overrides.split(",") if item]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny_lora.yaml")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("variants", nargs="+", help="NAME or NAME:key=value,...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "sweep.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    base = OmegaConf.load(args.config)
    pipeline = build_pipeline(load_config(base.model_config), None, default_device())[0]
    first = None
    for text in args.variants:
        name, overrides = parse_variant(text)
        first = first or name
        if name in results:
            continue
        work = args.out / name
        work.mkdir(exist_ok=True)
        config = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
        OmegaConf.save(config, work / "config.yaml")
        shared_teacher = args.out / first / "teacher"
        if name != first and all(o.startswith(STUDENT_SIDE) for o in overrides) and shared_teacher.exists() \
                and not (work / "teacher").exists():
            shutil.copytree(shared_teacher, work / "teacher")
        start = time.perf_counter()
        if finetune.main(["--config", str(work / "config.yaml"), "--data", str(args.data), "--out", str(work)]) != 0:
            return 1
        minutes = (time.perf_counter() - start) / 60
        results[name] = {"overrides": overrides, "finetune_minutes": round(minutes, 2),
                         **finetune_scores(pipeline, work / "lora.safetensors")}
        results_path.write_text(json.dumps(results, indent=1))
        print(name, json.dumps(results[name]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
