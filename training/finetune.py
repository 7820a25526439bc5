"""Fine-tune a generator on prepared clips in one command, the way its model config calls for.

    python -m training.finetune --config configs/tiny_lora.yaml --data DATA --out OUT [--weights W]

A few-step (distilled) generator must not learn a new concept by flow matching alone: flow matching
teaches the *mean* video, and its four big sampler steps then lose everything whose place is not yet
decided (the shape fades; tests/test_finetune_distilled.py shows it). So for a distilled model:

  1. teacher   a LoRA on the multi-step model the generator was distilled from (the model config's
               `teacher`) learns the clips by flow matching, which suits a many-step sampler;
  2. paths     the adapted teacher samples every clip's caption (`paths.per_clip` noises, some from the
               clip's own first latent) with many guided Euler steps, recording its path at the
               student's noise levels; and the student itself samples every `preserve.prompts` prompt
               with its own sampler, recording what it saw and predicted at each step;
  3. student   a LoRA on the generator regresses onto both (training/distill.py): every step of the
               few-step sampler lands on the adapted teacher's videos for the new captions, and does
               what it did before for the prompts it knew (that loss is zero before training).

A multi-step generator (or `transfer: flow`) gets one stage: flow matching on the clips. Every stage
resumes where it stopped (rerun the same command; --max-minutes pauses it with a checkpoint). The result
is OUT/lora.safetensors, its metadata saying what it was trained for (the inspector and the app show it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from pipelines.cli_options import HelpFormatter

from .config import FinetuneConfig, TrainingConfig, TrainingConfigError, load_finetune_config, load_training_config

log = logging.getLogger("training.finetune")
RESULT = "lora.safetensors"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.finetune", formatter_class=HelpFormatter,
                                     description=__doc__)
    parser.add_argument("--config", default="configs/tiny_lora.yaml", help="fine-tuning YAML")
    parser.add_argument("--data", type=Path, required=True, help="folder written by training.prepare")
    parser.add_argument("--out", type=Path, required=True, help="work folder: one subfolder per stage, the LoRA")
    parser.add_argument("--weights", help="weights folder of the model (and of its teacher)")
    parser.add_argument("--max-minutes", type=float, help="time budget of this command: a training stage pauses "
                                                          "with a checkpoint when it runs out (rerun to continue)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is there")
    return parser


@dataclasses.dataclass
class Stage:
    """One training stage: its name, model, loss and data, its work folder."""
    name: str
    config: TrainingConfig
    data: Path
    out: Path


class Finetune:
    """The stages of one fine-tuning run, chosen at construction from the model config."""

    def __init__(self, config: FinetuneConfig, data: Path, out: Path, weights: str | Path | None = None,
                 max_minutes: float | None = None, cpu: bool = False) -> None:
        from pipelines.config import load_config

        self.config, self.data, self.out, self.weights, self.cpu = config, data, out, weights, cpu
        self.deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
        self.model = load_config(config.model_config)
        self.distilled = self.model.is_distilled and config.transfer == "ode_regression"
        self.teacher_config = config.teacher_config or self.model.teacher
        if self.distilled and not self.teacher_config:
            raise TrainingConfigError(
                f"{self.model.source} is a few-step (distilled) model with no `teacher:` (the multi-step model it was "
                f"distilled from): name one as teacher_config in the fine-tuning YAML, or set `transfer: flow`")

    # -- the stages

    def stage_config(self, model_config: str, loss: str, overrides: dict) -> TrainingConfig:
        return load_training_config(None, {**self.config.training, **overrides, "model_config": model_config,
                                           "loss": loss})

    @property
    def stages(self) -> list[Stage]:
        if not self.distilled:
            return [Stage("student", self.stage_config(self.config.model_config, "flow", self.config.student),
                          self.data, self.out / "student")]
        return [Stage("teacher", self.stage_config(self.teacher_config, "flow", self.config.teacher),
                      self.data, self.out / "teacher"),
                Stage("student", self.stage_config(self.config.model_config, "ode_regression", self.config.student),
                      self.out / "paths", self.out / "student")]

    def minutes_left(self) -> float | None:
        return None if self.deadline is None else max(0.1, (self.deadline - time.monotonic()) / 60)

    def train(self, stage: Stage) -> bool:
        """Runs or continues a training stage; True once its LoRA is written."""
        from .train import Trainer, TrainRun

        if (stage.out / RESULT).exists():
            return True
        stage.out.mkdir(parents=True, exist_ok=True)
        resume = "latest" if list((stage.out / "checkpoints").glob("step-*")) else None
        run = TrainRun(stage.data, stage.out, self.weights, resume=resume, max_minutes=self.minutes_left(),
                       cpu=self.cpu)
        Trainer(run, stage.config).train()
        return (stage.out / RESULT).exists()

    def run(self) -> Path | None:
        """All stages in order; the LoRA's path, or None when --max-minutes paused a stage."""
        stages = self.stages
        names = ["teacher", "paths", "student"] if self.distilled else ["student"]
        for stage in stages:
            if stage.name == "student" and self.distilled:
                self.log_stage("paths", names)
                self.record_paths(stages[0])
            self.log_stage(stage.name, names)
            if not self.train(stage):
                log.info("paused in the %s stage (--max-minutes): run the same command again to continue", stage.name)
                return None
        return self.write_result(stages)

    @staticmethod
    def log_stage(name: str, names: list[str]) -> None:
        log.info("stage %d/%d: %s", names.index(name) + 1, len(names), name)

    # -- paths of the adapted teacher

    def path_jobs(self, encoder, text_len: int) -> tuple[list, list]:
        """(the adapted teacher's videos: each clip's caption `per_clip` times, an `image_to_video` share of
        those from the clip's own first latent; the student's own: each preserve prompt `per_prompt` times)."""
        import random

        from pipelines.config import parse_resolution

        from .data import CachedClips, ClipRecord, read_manifest
        from .distill import PathJob
        from .prepare import caption_embedding

        settings, jobs, preserved = self.config.paths, [], []
        records, clips = read_manifest(self.data), CachedClips(self.data, in_memory=True)
        rng = random.Random(self.config.training.get("seed", 0))
        for repeat in range(settings.per_clip):
            for index, record in enumerate(records):
                item = {k: v for k, v in clips[index].items() if k in ("latents", "prompt")}
                prefix = int(rng.random() < settings.image_to_video)
                jobs.append(PathJob(dataclasses.replace(record, clip_id=f"{record.clip_id}-{repeat}"), item, prefix))
        preserve = self.config.preserve
        if preserve.prompts:
            height, width = parse_resolution(preserve.resolution) if preserve.resolution else (self.model.height,
                                                                                               self.model.width)
            latent_h, latent_w = self.model.latent_size(height, width)
            frames = self.model.num_blocks * self.model.frames_per_block
            channels = clips[0]["latents"].shape[0]
            for number, prompt in enumerate(preserve.prompts):
                embedding = caption_embedding(encoder, prompt, "cpu").float()[:text_len]
                for repeat in range(preserve.per_prompt):
                    item = {"latents": torch.zeros(channels, frames, latent_h, latent_w), "prompt": embedding}
                    record = ClipRecord(f"preserve-{number:04d}-{repeat}", "preserve", 0.0, 0, prompt, "")
                    preserved.append(PathJob(record, item, 0))
        return jobs, preserved

    def paths_recorded(self, jobs: int, teacher_lora: Path) -> bool:
        from .data import MANIFEST, read_manifest

        manifest = self.out / "paths" / MANIFEST
        return (manifest.exists() and len(read_manifest(self.out / "paths")) == jobs
                and manifest.stat().st_mtime >= teacher_lora.stat().st_mtime)

    @torch.no_grad()
    def record_paths(self, teacher_stage: Stage) -> None:
        """OUT/paths: the student's own samples of the preserve prompts (what it sees and predicts at each of its
        sigmas, so regressing onto them keeps its behaviour) and the adapted teacher's videos of the clips' captions
        with their paths at the student's sigmas."""
        import shutil

        from pipelines.loading.lora import merge_permanently

        from .distill import on_policy_paths, record_paths, student_trajectories, teacher_trajectories
        from .objective import few_step_sigmas
        from .train import empty_prompt

        device = torch.device("cuda" if torch.cuda.is_available() and not self.cpu else "cpu")
        teacher, teacher_model, components = self.flow_step(self.teacher_config, device)
        text_len = teacher_model.model["text_len"]
        jobs, preserved = self.path_jobs(components.prompt_encoder, text_len)
        lora = teacher_stage.out / RESULT
        if self.paths_recorded(len(jobs) + len(preserved), lora):
            log.info("paths already recorded in %s", self.out / "paths")
            return
        settings = self.config.paths
        steps = settings.steps or teacher_model.sampler.num_steps
        guidance = settings.guidance if settings.guidance is not None else teacher_model.sampler.guidance_scale
        sigmas = few_step_sigmas(self.model.sampler)
        unconditional = empty_prompt(components.prompt_encoder, text_len)
        shutil.rmtree(self.out / "paths", ignore_errors=True)
        seed = self.config.training.get("seed", 0)
        merge_permanently(teacher.generator, lora)
        student = self.flow_step(self.config.model_config, device)[0] if preserved or settings.on_policy else None

        def adapted_teacher(batch: dict, prefix: int, generator: torch.Generator):
            if settings.on_policy:
                return on_policy_paths(student, teacher, batch["latents"], batch["prompts"], prefix, sigmas, steps,
                                       guidance, generator, unconditional)
            return teacher_trajectories(teacher, batch["latents"], batch["prompts"], prefix, sigmas, steps, guidance,
                                        generator, unconditional=unconditional)

        def own_sampler(batch: dict, prefix: int, generator: torch.Generator):
            return student_trajectories(student, batch["latents"], batch["prompts"], prefix, sigmas, generator)

        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            count = record_paths(adapted_teacher, jobs, self.out / "paths", text_len, seed, settings.batch_size)
            log.info("%d videos of the adapted teacher (%d Euler steps a block, guidance %.1f%s)", count, steps,
                     guidance, ", at the student's own inputs" if settings.on_policy else "")
            if preserved:
                kept = record_paths(own_sampler, preserved, self.out / "paths", text_len, seed + 1,
                                    settings.batch_size)
                log.info("%d preserve videos from the student's own %d-step sampler", kept, len(sigmas))

    def flow_step(self, model_config: str, device: torch.device):
        """(a FlowStep over the model's generator on `device`, the model config, its components)."""
        from pipelines.config import load_config
        from pipelines.loading.weights import load_components

        from .train import FlowStep

        model = load_config(model_config)
        components = load_components(model, self.weights, "cpu")
        generator = components.generator.to(device=device, dtype=torch.bfloat16 if device.type == "cuda"
                                            else torch.float32)
        step = FlowStep(generator, model.frames_per_block, model.model["text_len"]).to(device).eval()
        return step, model, components

    # -- the result

    def write_result(self, stages: list[Stage]) -> Path:
        """The student's LoRA as OUT/lora.safetensors, its metadata naming every stage (kept as it is when it was
        written from this student LoRA already)."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        from .data import read_manifest

        student, path = stages[-1].out / RESULT, self.out / RESULT
        if path.exists() and path.stat().st_mtime >= student.stat().st_mtime:
            log.info("%s is up to date", path)
            return path
        with safe_open(str(student), "pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = dict(handle.metadata() or {})
        records = read_manifest(self.data)
        described = [f"{s.name}: {Path(s.config.model_config).name} {s.config.loss} {s.config.max_steps} steps"
                     for s in stages]
        if self.distilled:
            paths = read_manifest(self.out / "paths")
            kept = sum(record.source == "preserve" for record in paths)
            described.insert(1, f"paths: {len(paths) - kept} teacher videos, {kept} of the student's own "
                                f"({len(self.config.preserve.prompts)} preserve prompts)")
        metadata.update({"base_config": Path(self.model.source).name, "stages": "; ".join(described),
                         "steps": str(sum(s.config.max_steps for s in stages)), "clips": str(len(records)),
                         "captions": str(len({record.caption for record in records}))})
        save_file(state, str(path), metadata=metadata)
        (self.out / "finetune.json").write_text(json.dumps(metadata, indent=2))
        log.info("wrote %s (%s)", path, metadata["stages"])
        return path


def main(argv: list[str] | None = None) -> int:
    from pipelines.loading.weights import WeightsError

    from .train import TrainingError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        config = load_finetune_config(args.config)
        args.out.mkdir(parents=True, exist_ok=True)
        Finetune(config, args.data, args.out, args.weights, args.max_minutes, args.cpu).run()
    except (TrainingError, TrainingConfigError, WeightsError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
