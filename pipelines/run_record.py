"""A run's record, written beside its video: what made the frames (model, weights files, settings, seed, size,
LoRAs, input image) and, per block, the prompt in force, how it was switched, a new seed and how long it took.
A branch's record is the record of the fresh run it equals (pipelines/branch.py). Replaying a
record through the same pipeline reproduces the run: the same latents on the same device and dtype.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from PIL import Image

from .core import BlockResult, GenerationRequest, StreamingVideoPipeline, ValidatedRequest
from .loading.lora import LoraChoice
from .steering import PromptSwitch, ScriptedSteering

RECORD_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class RunRecordError(ValueError):
    """A record that cannot be replayed here; the message says what differs and what to do."""


def image_digest(image: Image.Image) -> str:
    """The input image's identity by its pixels (its file format does not matter)."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.width}x{rgb.height}".encode() + rgb.tobytes()).hexdigest()


def model_identity(pipeline: StreamingVideoPipeline) -> dict:
    """The config, the loaded files (names and sizes) and the dtype: what a replay must load again."""
    folder = pipeline.components.model_dir
    files = sorted((str(p.relative_to(folder)), p.stat().st_size) for p in Path(folder).rglob("*")
                   if p.suffix in WEIGHT_SUFFIXES and p.is_file()) if folder is not None else []
    return {"config": pipeline.config.name, "weights": pipeline.components.description,
            "files": [{"name": name, "bytes": size} for name, size in files], "dtype": str(pipeline.dtype),
            "use_ema": pipeline.config.weights.use_ema}


def frame_settings(pipeline: StreamingVideoPipeline, fast_decode: bool) -> dict:
    """Every setting that changes the frames (beyond the model and the request)."""
    settings = pipeline.settings
    return {"device": pipeline.device.type, "fp8_linears": settings.fp8_linears,
            "kv_cache_fp8": settings.kv_cache_fp8, "kv_cache_budget": settings.kv_cache_budget,
            "attention": settings.attention, "compiled": settings.compiled, "fast_decode": fast_decode}


class RunRecorder:
    """Builds one run's record as its blocks arrive."""

    def __init__(self, pipeline: StreamingVideoPipeline, validated: ValidatedRequest, tab: str = "t2v") -> None:
        request = validated.request
        self.record = {
            "version": RECORD_VERSION, "tab": tab, "model": model_identity(pipeline),
            "settings": frame_settings(pipeline, request.fast_decode), "seed": request.seed,
            "height": validated.height, "width": validated.width, "num_blocks": validated.num_blocks,
            "continuous": request.continuous, "prompt": request.prompt, "negative_prompt": request.negative_prompt,
            "image": image_digest(request.image) if request.image is not None else None,
            "loras": [{"name": Path(c.path).name, "bytes": Path(c.path).stat().st_size, "strength": c.scale}
                      for c in request.loras],
            "branch_block": request.resume.block if request.resume is not None else None,
            "drift_guard": request.drift_guard,
            "strength": request.strength if request.source is not None else None,
            "blocks": []}

    def add(self, result: BlockResult) -> None:
        if result.complete:
            self.record["blocks"].append({
                "index": result.index, "prompt": result.prompt, "switch": result.switch_mode, "reseed": result.reseed,
                "switch_ms": None if result.switch_ms is None else round(result.switch_ms, 1),
                "block_ms": round(result.block_s * 1e3, 1), "elapsed_s": round(result.elapsed_s, 3),
                "window_frames": result.window_frames, "refresh": result.refreshed,
                "drift": result.drift.as_dict() if result.drift is not None else None})

    def json(self) -> str:
        return json.dumps(self.record, indent=1)


def read_record(path: str | Path) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise RunRecordError(f"Could not read the run record {path}: {err}") from err
    return parse_record(text, str(path))


def parse_record(text: str, name: str = "The file") -> dict:
    """A record's JSON (RunRecordError for anything else, or another version's record)."""
    try:
        record = json.loads(text)
    except ValueError as err:
        raise RunRecordError(f"{name} is not a run record ({err}).") from err
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        raise RunRecordError(f"{name} is not a run record of this version (expected version {RECORD_VERSION}).")
    return record


def replay_request(record: dict, pipeline: StreamingVideoPipeline, image: Image.Image | None = None,
                   loras: list[str | Path] = ()) -> GenerationRequest:
    """The request that reproduces the recorded run on `pipeline` (RunRecordError when the model, the settings,
    the image or the LoRA files are not the recorded ones)."""
    if record.get("tab") in ("pose", "v2v"):
        raise RunRecordError("Pose animation and video-to-video runs cannot be replayed from their record yet (it "
                             "does not hold the input video).")
    differences = _differences("model", record["model"], model_identity(pipeline))
    differences += _differences("setting", record["settings"], frame_settings(pipeline, record["settings"]["fast_decode"]))
    if differences:
        raise RunRecordError("This pipeline is not the one the run was made with: " + "; ".join(differences) +
                             ". Load the recorded config and weights with the same options (--config, --weights, "
                             "--dtype, --device, --compile, --fp8, --memory-profile).")
    if record["image"] is not None:
        if image is None:
            raise RunRecordError("The run started from an image: pass the same image (--image).")
        if image_digest(image) != record["image"]:
            raise RunRecordError("The image given is not the one the run started from.")
    choices = []
    given = {Path(p).name: Path(p) for p in loras}
    for lora in record["loras"]:
        path = given.get(lora["name"])
        if path is None or not path.is_file() or path.stat().st_size != lora["bytes"]:
            raise RunRecordError(f"The run used the LoRA {lora['name']} ({lora['bytes']:,} bytes): pass that file "
                                 f"(--lora PATH).")
        choices.append(LoraChoice(str(path), lora["strength"]))
    switches = {block["index"]: PromptSwitch(block["prompt"], block["switch"]) for block in record["blocks"]
                if block["switch"] is not None}
    reseeds = {block["index"]: block["reseed"] for block in record["blocks"] if block.get("reseed") is not None}
    return GenerationRequest(record["prompt"], seed=record["seed"], num_blocks=record["num_blocks"],
                             negative_prompt=record["negative_prompt"], image=image, height=record["height"],
                             width=record["width"], loras=tuple(choices), steering=ScriptedSteering(switches),
                             reseeds=reseeds, drift_guard=record.get("drift_guard"),
                             continuous=record["continuous"], fast_decode=record["settings"]["fast_decode"])


def _differences(kind: str, recorded: dict, current: dict) -> list[str]:
    return [f"{kind} {key}: recorded {recorded.get(key)!r}, loaded {current.get(key)!r}"
            for key in sorted(set(recorded) | set(current)) if recorded.get(key) != current.get(key)]
