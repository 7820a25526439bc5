"""A visitor's tree of runs: each run (a first run or a branch of another) with the blocks it keeps for branching.

Branching from block k of a run needs that run's clean latents and random state up to k (pipelines/branch.py).
They are kept here, in the visitor's session on the front end's CPU, within a cap per visitor: when a new block
would pass it, the oldest other runs' blocks are dropped first, then the current run stops keeping more; either
way the page says so, and a branch from a dropped block is refused with what is still possible.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.branch import Branch, KeptBlock
from serving.jobs import Block, StreamJob


class BranchError(ValueError):
    """A branch that cannot be made (message for the visitor)."""


@dataclass
class RunNode:
    """One run of the visitor's tree."""

    number: int  # run number in the session (1-based, as its folder runNNN)
    job: StreamJob  # what describes the whole run from its first block (no branch data)
    prompt: str  # the prompt its first generated block ran under
    parent: int | None = None
    branch_block: int | None = None  # 1-based block the branch starts at
    video: Path | None = None
    blocks: list[KeptBlock] = field(default_factory=list)
    previews: list[bytes] = field(default_factory=list)  # each kept block's last frame (JPEG)
    made: int = 0  # complete blocks the run made (kept or not)
    dropped: str | None = None  # why its later blocks are not kept
    done: bool = False

    @property
    def kept_bytes(self) -> int:
        return unique_bytes([self])

    def label(self) -> str:
        origin = f" ← run {self.parent} at block {self.branch_block}" if self.parent is not None else ""
        text = self.prompt if len(self.prompt) <= 60 else self.prompt[:59] + "…"
        return f"run {self.number}{origin}: {text}"


def unique_bytes(runs: list[RunNode]) -> int:
    """Memory the runs' kept blocks take, each block counted once (branches share their parent's)."""
    blocks = {id(kept): kept for run in runs for kept in run.blocks}
    previews = {id(preview): preview for run in runs for preview in run.previews}
    return sum(b.latents.numel() * b.latents.element_size() + b.rng_state.numel() for b in blocks.values()) + \
        sum(map(len, previews.values()))


class RunTree:
    """The visitor's runs and their kept blocks, within `cap_bytes` (never shared between sessions)."""

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self.runs: dict[int, RunNode] = {}
        self._lock = threading.Lock()  # (a branch request may read while a run adds its blocks)

    def start(self, number: int, job: StreamJob, prompt: str) -> RunNode:
        """A new run of `job`, whose first block ran under `prompt` (the extended one when it was extended)."""
        kept_job = dataclasses.replace(job, prompt=prompt, branch=None, extend=False, replay=None,
                                       source_video=None, camera=None)  # (video-to-video runs are not branched)
        node = RunNode(number, kept_job, prompt)
        with self._lock:
            self.runs[number] = node
        return node

    def start_branch(self, number: int, parent: int, branch: Branch) -> RunNode:
        """A branch of run `parent`: its blocks before the branch point are the parent's (restored blocks bring no
        random state of their own)."""
        with self._lock:
            source, block = self.runs[parent], branch.block
            in_force = branch.blocks[-1].prompt if branch.blocks else source.prompt
            previews = source.previews[:block] if len(source.previews) >= block else [b""] * block
            node = RunNode(number, source.job, branch.prompt or in_force, parent=parent, branch_block=block + 1,
                           blocks=list(branch.blocks), previews=list(previews), made=block)
            self.runs[number] = node
        return node

    def last_branch_block(self, run: RunNode) -> int:
        """The last 1-based block `run` can be branched from now (0: none)."""
        if not run.blocks:
            return 0
        last = len(run.blocks) + 1
        return last if run.job.continuous or run.job.num_blocks is None else min(last, run.job.num_blocks)

    def add(self, node: RunNode, event: Block) -> str | None:
        """Keeps a complete generated block of `node`; a note for the page when the cap dropped something."""
        if not event.complete or event.restored or event.latents is None or event.rng_state is None:
            return None
        node.made += 1
        if node.dropped is not None:
            return None
        kept = KeptBlock(event.prompt, event.switch_mode, event.reseed, event.latents, event.rng_state)
        size = kept.latents.numel() * kept.latents.element_size() + kept.rng_state.numel() + len(event.preview)
        with self._lock:
            note = self._make_room(node, size)
            if node.dropped is None:
                node.blocks.append(kept)
                node.previews.append(event.preview)
        return note

    def _make_room(self, node: RunNode, size: int) -> str | None:
        """Drops the fewest oldest other runs' blocks that make room for `size` more bytes (a branch shares its
        kept blocks with its parent: only blocks no remaining run holds are freed); when no such set exists, `node`
        stops keeping blocks instead."""
        others = sorted((run for run in self.runs.values() if run is not node and run.blocks), key=lambda r: r.number)
        for count in range(len(others) + 1):
            remaining = [run for run in self.runs.values() if run not in others[:count]]
            if unique_bytes(remaining) + size <= self.cap_bytes:
                break
        else:
            node.dropped = f"not kept after block {len(node.blocks)}"
            return (f"blocks after {len(node.blocks)} of this run cannot be branched from (the {self.cap_mb} MB of "
                    f"branch points each visitor keeps are full)")
        for run in others[:count]:
            run.blocks, run.previews, run.dropped = [], [], "dropped to make room for newer runs"
        if count:
            names = ", ".join(f"run {run.number}" for run in others[:count])
            return f"{names} can no longer be branched (kept blocks dropped, {self.cap_mb} MB cap)"
        return None

    @property
    def cap_mb(self) -> str:
        return f"{self.cap_bytes / 2**20:g}"

    def branch(self, number: int, block: int, prompt: str | None, mode: str, seed: int | None) -> StreamJob:
        """The job for a branch of run `number` from its 1-based `block` (BranchError when it cannot be made)."""
        with self._lock:
            run = self.runs.get(number)
            if run is None:
                raise BranchError(f"There is no run {number} in this session to branch from.")
            if block < 2:
                raise BranchError("Branch from block 2 or later (from block 1 it is a new run: press Generate).")
            if block - 1 > len(run.blocks):
                if run.dropped is not None and block - 1 <= run.made:
                    raise BranchError(f"Block {block} of run {number} can no longer be branched from: its kept "
                                      f"blocks were {run.dropped} (each visitor keeps {self.cap_mb} MB of branch "
                                      f"points). " + (f"Branch from block {len(run.blocks) + 1} or earlier."
                                                      if run.blocks else "Branch from a newer run."))
                raise BranchError(f"Run {number} has made {run.made} block{'s' if run.made != 1 else ''} so far: "
                                  f"branch from block {run.made + 1} or earlier.")
            if run.job.num_blocks is not None and not run.job.continuous and block > run.job.num_blocks:
                raise BranchError(f"Run {number} has {run.job.num_blocks} blocks: branch from block "
                                  f"{run.job.num_blocks} or earlier.")
            kept = tuple(run.blocks[:block - 1])
        return dataclasses.replace(run.job, branch=Branch(kept, prompt=prompt or None, mode=mode, seed=seed))

    def choices(self, tab: str) -> list[tuple[str, int]]:
        return [(run.label(), run.number) for run in self.runs.values() if run.job.tab == tab]

    def markdown(self) -> str:
        """The tree, children under their parents."""
        lines = []

        def walk(number: int | None, depth: int) -> None:
            for run in self.runs.values():
                if run.parent == number:
                    state = f"{run.made} blocks" + (", running" if not run.done else "")
                    last = self.last_branch_block(run)
                    state += f", branch from blocks 2-{last}" if last >= 2 else ", not branchable"
                    lines.append(f"{'  ' * depth}- {run.label()} ({state})")
                    walk(run.number, depth + 1)
        walk(None, 0)
        return "\n".join(lines)
