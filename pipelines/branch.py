"""Branching a stream: go on from a block boundary of an earlier run under a new prompt or a new seed.

A branch from block k is, by definition, the run a fresh generation would make with the earlier run's prompt
switches and seed changes before k plus the branch's own change at k; so its run record replays like any other.
It is made faster than that: the blocks before k are not denoised again. Their kept clean latents refill the KV
caches (the same passes, in the same order, as when they were made) and the decoder, and the random generator is
set to the state it had at the boundary. Per block only the latents (about 1.2 MB at 832x480) and the generator's
state (5 KB on the CPU, 16 bytes on a GPU) are kept; restoring costs one cache pass and one decode per earlier
block (bench/results/NOTES.md compares this with keeping KV-cache snapshots).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .steering import PromptSteering, PromptSwitch, ScriptedSteering


@dataclass(frozen=True)
class ResumeFrom:
    """What the core restores before it generates block `block`: the clean latents of every block before it and
    the random generator's state after the last of them (None when a new seed starts at `block`)."""

    block: int
    latents: tuple[torch.Tensor, ...]
    rng_state: torch.Tensor | None

    def __post_init__(self) -> None:
        if len(self.latents) != self.block:
            raise ValueError(f"a resume from block {self.block} needs the latents of {self.block} blocks, "
                             f"got {len(self.latents)}")


@dataclass(frozen=True)
class KeptBlock:
    """One block of an earlier run as a branch needs it: how it was conditioned and what it produced."""

    prompt: str  # the prompt in force for this block
    switch: str | None  # how the prompt was switched before it (steering.SWITCH_MODES), None if it was not
    reseed: int | None  # the seed whose noise started at this block, None if the noise went on
    latents: torch.Tensor = dataclasses.field(repr=False)  # its clean latents [1, C, F, h, w] on the CPU
    rng_state: torch.Tensor = dataclasses.field(repr=False)  # the random generator's state after it


@dataclass(frozen=True)
class Branch:
    """Continue an earlier run after `blocks` (its first len(blocks) blocks, kept) with a new prompt and/or seed."""

    blocks: tuple[KeptBlock, ...]
    prompt: str | None = None  # the prompt from the branch point on (None or the same: the one in force goes on)
    mode: str = "recache"  # how the new prompt is switched in
    seed: int | None = None  # new noise from the branch point (None: the earlier run's noise goes on)

    @property
    def block(self) -> int:
        """The first block the branch generates (0-based)."""
        return len(self.blocks)

    def switches(self) -> dict[int, PromptSwitch]:
        """The prompt switches of the kept blocks and, at the branch point, the branch's own."""
        switches = {index: PromptSwitch(kept.prompt, kept.switch) for index, kept in enumerate(self.blocks)
                    if kept.switch is not None}
        in_force = self.blocks[-1].prompt if self.blocks else None
        if self.prompt and self.prompt.strip() != in_force:
            switches[self.block] = PromptSwitch(self.prompt.strip(), self.mode)
        return switches

    def reseeds(self) -> dict[int, int]:
        reseeds = {index: kept.reseed for index, kept in enumerate(self.blocks) if kept.reseed is not None}
        if self.seed is not None:
            reseeds[self.block] = self.seed
        return reseeds

    def request(self, base, live: PromptSteering | None = None):
        """`base` (the earlier run's request: its first prompt, seed, size, inputs and LoRAs) as this branch; after
        the branch point `live` carries the visitor's new prompts."""
        resume = ResumeFrom(self.block, tuple(kept.latents for kept in self.blocks),
                            None if self.seed is not None or not self.blocks else self.blocks[-1].rng_state)
        steering = ScriptedSteering(self.switches(), scripted_blocks=self.block + 1, live=live)
        return dataclasses.replace(base, steering=steering, reseeds=self.reseeds(), resume=resume)
