"""How well a model trained on the synthetic world does, through the app's own pipeline.

- text-to-video on held-out prompts (colour x shape x motion triples never trained on): is the
  named colour's blob there, and does it move the caption's way (training/evaluate.py); the same
  prompts again without their background phrase, as users often type them
- image-to-video on held-out scenes: PSNR of the first frame against the input image, and the
  shape's colour staying visible through the clip; the same on brighter backgrounds
- pose: keypoint error of the generated stick figure against the driving skeleton, next to the
  same run with the driving frames shuffled in time
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.core import GenerationRequest, StreamingVideoPipeline
from pipelines.loading.lora import LoraChoice
from pipelines.loading.vae import frames_psnr

from .evaluate import PromptScore, keypoint_error, score_video, summarise, track_blob
from .synthetic import SyntheticWorld, figure_keypoints, pose_frames, render


def video(pipeline: StreamingVideoPipeline, request: GenerationRequest) -> np.ndarray:
    return np.concatenate([result.frames for result in pipeline.generate(request)])


def text_to_video_scores(pipeline: StreamingVideoPipeline, world: SyntheticWorld, count: int = 24,
                         loras: tuple[LoraChoice, ...] = (), name_background: bool = True) -> list[PromptScore]:
    """The world's held-out prompts (optionally with LoRAs merged: is anything forgotten?)."""
    scenes = [world.held_out_scene(index, name_background=name_background) for index in range(count)]
    return _scored(pipeline, scenes, loras)


def concept_scores(pipeline: StreamingVideoPipeline, world: SyntheticWorld, loras: tuple[LoraChoice, ...],
                   count: int = 16) -> list[PromptScore]:
    """Captions of the fine-tuning example's concept (SyntheticWorld.concept_scene) on scenes not among its
    training clips, one seed each: is the new colour there, and does it move the caption's way?"""
    return _scored(pipeline, [world.concept_scene(1000 + index) for index in range(count)], loras)


def finetune_scores(pipeline: StreamingVideoPipeline, lora: str | Path, strength: float = 1.0) -> dict:
    """The fine-tuning example's scores with `lora` merged: the concept's captions (colour found, and of those
    found the share moving the caption's way) and the world's held-out prompts (is anything forgotten?)."""
    choice = (LoraChoice(str(lora), strength),)
    concept = concept_scores(pipeline, SyntheticWorld(0, frames=33), choice)
    found = [score for score in concept if score.found]
    return {"concept": summarise(concept),
            "concept_direction_of_found": float(np.mean([s.direction_ok for s in found])) if found else 0.0,
            "world": summarise(text_to_video_scores(pipeline, SyntheticWorld(0), loras=choice))}


def _scored(pipeline: StreamingVideoPipeline, scenes: list, loras: tuple[LoraChoice, ...]) -> list[PromptScore]:
    scores = []
    for index, scene in enumerate(scenes):
        spec = scene.shapes[0]
        frames = video(pipeline, GenerationRequest(scene.caption, seed=index, loras=loras))
        scores.append(score_video(frames, scene.caption, spec.colour, spec.motion))
    return scores


def image_to_video_scores(pipeline: StreamingVideoPipeline, world: SyntheticWorld, count: int = 8,
                          bright: bool = False) -> list[dict]:
    results = []
    for index in range(count):
        scene = world.held_out_scene(100 + index, bright=bright)
        first = render(scene)[0]
        frames = video(pipeline, GenerationRequest(scene.caption, seed=index, image=Image.fromarray(first)))
        track = track_blob(frames, scene.shapes[0].colour)
        results.append({"caption": scene.caption, "first_frame_psnr_db": frames_psnr(frames[0], first),
                        "colour_present": float(track.present.mean())})
    return results


def pose_scores(pipeline: StreamingVideoPipeline, animator, world: SyntheticWorld, count: int = 4) -> list[dict]:
    """Keypoint error (fraction of the frame height) following the driving skeleton and following the
    same skeleton frames in shuffled order, per held-out stick-figure scene."""
    results = []
    for index in range(count):
        scene = world.figure_scene_at(index)
        frames, skeletons = render(scene), pose_frames(scene)
        keypoints = np.stack([figure_keypoints(scene.figure, i, scene.height, scene.width)
                              for i in range(scene.frames)])
        driving = list(skeletons[4:])  # the frames after the reference's, as the trainer aligns them
        shuffled = [driving[i] for i in np.random.default_rng(index).permutation(len(driving))]
        errors = {}
        for name, poses in (("driven", driving), ("shuffled", shuffled)):
            base = GenerationRequest(scene.caption, seed=index)
            request = animator.request(Image.fromarray(frames[0]), poses, True, base)
            generated = video(pipeline, request)
            length = min(len(generated), len(keypoints))
            errors[name] = keypoint_error(generated[1:length], keypoints[1:length], scene.figure.colour)
        results.append({"caption": scene.caption, **errors})
    return results


def evaluate_model(model_dir: Path | None, device: torch.device | str = "cpu", sampler: dict | None = None,
                   config_path: str = "configs/tiny.yaml") -> dict:
    """All scores for the tiny model in model_dir (None: the bundled one), sampled with the config's
    sampler or `sampler` (a config's sampler section: how the distillation teacher is scored);
    configs/tiny_multistep.yaml scores the shipped teacher."""
    from omegaconf import OmegaConf

    from pipelines.builder import build_pipeline
    from pipelines.config import load_config
    from pipelines.pose.animation import make_pose_animator

    config = load_config(config_path)
    if sampler is not None:
        config.sampler = OmegaConf.create({"context_noise": 0, **sampler})
    pipeline, _ = build_pipeline(config, model_dir, str(device))
    world = SyntheticWorld(0)
    t2v = text_to_video_scores(pipeline, world)
    unnamed = text_to_video_scores(pipeline, world, name_background=False)
    pose = pose_scores(pipeline, make_pose_animator(pipeline, None), world)

    def image_to_video(bright: bool) -> dict:
        i2v = image_to_video_scores(pipeline, world, bright=bright)
        return {"first_frame_psnr_db": float(np.mean([r["first_frame_psnr_db"] for r in i2v])),
                "colour_present": float(np.mean([r["colour_present"] for r in i2v]))}

    return {"text_to_video": summarise(t2v),
            "text_to_video_prompts": [dataclasses.asdict(s) for s in t2v],
            "text_to_video_no_background": summarise(unnamed),
            "text_to_video_no_background_prompts": [dataclasses.asdict(s) for s in unnamed],
            "image_to_video": image_to_video(bright=False),
            "image_to_video_bright": image_to_video(bright=True),
            "pose": {"driven": float(np.mean([r["driven"] for r in pose])),
                     "shuffled": float(np.mean([r["shuffled"] for r in pose]))}}
