"""Training data: source videos and captions in, cached latent clips out, and the cache read back.

A prepared data folder holds safetensors shards (`shard-00000.safetensors`, ...) and one
`manifest.jsonl` line per clip (clip id, source file, start time, frames, caption, shard). Each
clip is stored as `<id>.latents` [C, F, h, w] and `<id>.prompt` [tokens, d] (the caption's UMT5
embedding without padding), plus `<id>.pose` [F', H, W, 3] and `<id>.reference_pose` [H, W, 3]
(uint8) when prepared with poses.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif", ".m4v"}
TARGET_FPS = 16
MANIFEST = "manifest.jsonl"


class VideoError(RuntimeError):
    """A source video that cannot be used (unreadable or too short); the message is the log line."""


@dataclass
class ClipRecord:
    clip_id: str
    source: str
    start_s: float
    frames: int
    caption: str
    shard: str


def find_videos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())


def read_captions(videos: list[Path], captions_file: Path | None) -> dict[Path, str]:
    """Captions from one CSV/JSONL (columns/keys: path, caption; paths relative to the file's folder
    or absolute) or, failing that, a sidecar `clip.txt` beside each `clip.mp4`."""
    found: dict[Path, str] = {}
    if captions_file is not None:
        rows: list[dict] = []
        if captions_file.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in captions_file.read_text().splitlines() if line.strip()]
        else:
            with captions_file.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
        for row in rows:
            path = Path(row["path"])
            path = path if path.is_absolute() else captions_file.parent / path
            found[path.resolve()] = str(row["caption"]).strip()
    for video in videos:
        sidecar = video.with_suffix(".txt")
        if video.resolve() not in found and sidecar.is_file():
            found[video.resolve()] = sidecar.read_text().strip()
    return {video: found[video.resolve()] for video in videos if found.get(video.resolve())}


def probe(video: Path) -> tuple[float, int, int]:
    """(duration in seconds, width, height) from the container, without decoding frames."""
    import imageio_ffmpeg  # only video sources need ffmpeg (the synthetic world renders its frames)

    try:
        reader = imageio_ffmpeg.read_frames(str(video))
        meta = next(reader)
        reader.close()
    except (OSError, RuntimeError, StopIteration) as err:
        raise VideoError(f"unreadable ({type(err).__name__})") from err
    return float(meta.get("duration") or 0.0), *meta["size"]


def expected_clips(duration_s: float, clip_frames: int, stride: int) -> int:
    frames = int(duration_s * TARGET_FPS + 1e-6)
    return 0 if frames < clip_frames else 1 + (frames - clip_frames) // stride


def decode_at_16fps(video: Path) -> np.ndarray:
    """All frames resampled to 16 fps by ffmpeg: uint8 [T, H, W, 3]."""
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(video), output_params=["-vf", f"fps={TARGET_FPS}"])
        meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
    except (OSError, RuntimeError, StopIteration, KeyError, ValueError) as err:
        raise VideoError(f"unreadable ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})") \
            from err
    if not frames:
        raise VideoError("no frames")
    return np.stack(frames)


def cut_clips(frames: np.ndarray, clip_frames: int, stride: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start frame, clip) windows of clip_frames frames every `stride` frames."""
    if len(frames) < clip_frames:
        raise VideoError(f"too short: {len(frames)} frames at {TARGET_FPS} fps, a clip needs {clip_frames}")
    for start in range(0, len(frames) - clip_frames + 1, stride):
        yield start, frames[start:start + clip_frames]


class ShardWriter:
    """Collects clips and writes them as safetensors shards; the manifest only ever lists written clips."""

    def __init__(self, folder: Path, clips_per_shard: int = 32) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.clips_per_shard = clips_per_shard
        self.pending: dict[str, torch.Tensor] = {}
        self.records: list[ClipRecord] = []
        self.next_index = len(list(folder.glob("shard-*.safetensors")))

    @property
    def shard_name(self) -> str:
        return f"shard-{self.next_index:05d}.safetensors"

    def add(self, record: ClipRecord, tensors: dict[str, torch.Tensor]) -> None:
        record.shard = self.shard_name
        self.pending.update({f"{record.clip_id}.{name}": t.detach().cpu().clone() for name, t in tensors.items()})
        self.records.append(record)
        if len(self.records) >= self.clips_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.records:
            return
        save_file(self.pending, str(self.folder / self.shard_name))
        with (self.folder / MANIFEST).open("a", encoding="utf-8") as manifest:
            for record in self.records:
                manifest.write(json.dumps(asdict(record)) + "\n")
        self.pending, self.records = {}, []
        self.next_index += 1


def read_manifest(folder: Path) -> list[ClipRecord]:
    path = folder / MANIFEST
    if not path.is_file():
        return []
    return [ClipRecord(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


class CachedClips(torch.utils.data.Dataset):
    """The prepared clips; item i -> dict of tensors (latents, prompt, and pose data when present).

    in_memory: read each shard once and keep it (small data sets, many epochs)."""

    def __init__(self, folder: str | Path, in_memory: bool = False) -> None:
        self.folder = Path(folder)
        self.records = read_manifest(self.folder)
        if not self.records:
            raise FileNotFoundError(f"{self.folder / MANIFEST} lists no clips: run python -m training.prepare first")
        self.in_memory = in_memory
        self.loaded: dict[str, dict[str, torch.Tensor]] = {}  # clip id -> its tensors (in_memory)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        prefix = record.clip_id + "."
        if self.in_memory:
            if record.clip_id not in self.loaded:
                for key, value in load_file(str(self.folder / record.shard)).items():
                    clip_id, name = key.rsplit(".", 1)
                    self.loaded.setdefault(clip_id, {})[name] = value
            return self.loaded[record.clip_id]
        with safe_open(str(self.folder / record.shard), "pt") as shard:
            return {key[len(prefix):]: shard.get_tensor(key) for key in shard.keys() if key.startswith(prefix)}

    @property
    def has_poses(self) -> bool:
        """Whether any clip carries poses (a folder may mix clips with and without)."""
        for name in sorted({record.shard for record in self.records}):
            with safe_open(str(self.folder / name), "pt") as shard:
                if any(key.endswith(".pose") for key in shard.keys()):
                    return True
        return False


def collate(items: list[dict], text_len: int) -> dict:
    """Clips of one size as a batch: latents stacked, prompts zero-padded to text_len tokens, trajectories
    (teacher paths) stacked, poses as per-clip lists (None for clips without)."""
    prompts = torch.zeros(len(items), text_len, items[0]["prompt"].shape[-1])
    for row, item in enumerate(items):
        tokens = min(text_len, item["prompt"].shape[0])
        prompts[row, :tokens] = item["prompt"][:tokens].float()
    batch = {"latents": torch.stack([item["latents"].float() for item in items]), "prompts": prompts}
    if "trajectory" in items[0]:
        batch["trajectory"] = torch.stack([item["trajectory"].float() for item in items])
    if any("targets" in item for item in items):  # per-level targets; a teacher path's target is its end
        batch["targets"] = torch.stack([item["targets"].float() if "targets" in item else
                                        item["latents"].float()[None].expand_as(item["trajectory"])
                                        for item in items])
    if any("pose" in item for item in items):
        batch["poses"] = [item["pose"].numpy() if "pose" in item else None for item in items]
        batch["reference_poses"] = [item["reference_pose"].numpy() if "pose" in item else None for item in items]
    return batch
