"""--gpus and --split: which rank does what (light: the command lines import it for their choices).

Splits:
  sequence  every rank takes a share of each generator pass (sequence.py); rank 0 decodes.
  decode    rank 0 runs the whole generator, the last rank decodes and encodes prompts (2 GPUs).
  both      ranks 0..N-2 split each pass, the last rank decodes (3 or more GPUs).
  auto      decode on 2 GPUs, both on more.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import PipelineConfig

SPLITS = ("auto", "sequence", "decode", "both")


class ParallelError(ValueError):
    """A --gpus/--split choice this model or machine cannot run; the message says what to change."""


@dataclass(frozen=True)
class ParallelLayout:
    gpus: int
    split: str = "auto"

    def __post_init__(self) -> None:
        if self.gpus < 2:
            raise ParallelError(f"--gpus must be at least 2 to split a stream, got {self.gpus}.")
        if self.split not in SPLITS:
            raise ParallelError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}.")
        if self.mode == "decode" and self.gpus != 2:
            raise ParallelError("--split decode uses exactly 2 GPUs (one generates, one decodes); with more, use "
                                "--split both.")
        if self.mode == "both" and self.gpus < 3:
            raise ParallelError("--split both needs at least 3 GPUs (2 or more generate, one decodes).")

    @property
    def mode(self) -> str:
        if self.split != "auto":
            return self.split
        return "decode" if self.gpus == 2 else "both"

    @property
    def generator_ranks(self) -> int:
        """Ranks 0..generator_ranks-1 split each generator pass."""
        return {"sequence": self.gpus, "decode": 1, "both": self.gpus - 1}[self.mode]

    @property
    def decode_rank(self) -> int | None:
        return None if self.mode == "sequence" else self.gpus - 1

    def check(self, config: PipelineConfig) -> None:
        """Refuses what this model cannot split (raises ParallelError)."""
        heads = config.model.get("num_heads", 12)
        if heads % self.generator_ranks:
            raise ParallelError(f"{config.name} has {heads} attention heads, which {self.generator_ranks} ranks "
                                f"cannot share evenly: choose --gpus so that the generating ranks divide {heads}.")
        if self.generator_ranks > 1 and config.text_to_video_only:
            raise ParallelError(f"{config.name} denoises a rolling window of blocks in one pass, which is not split "
                                f"over GPUs: use --split decode.")

    def describe(self) -> str:
        parts = [f"generator split over {self.generator_ranks} GPUs" if self.generator_ranks > 1 else
                 "generator on GPU 0"]
        if self.decode_rank is not None:
            parts.append(f"decoding and prompts on GPU {self.decode_rank}")
        return ", ".join(parts)
