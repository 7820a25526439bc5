"""Live direction: a new prompt for a generation that is already streaming.

The UI or API posts a prompt into the run's PromptSteering; the pipeline core takes it before
its next block. Two ways to switch (LongLive's terms):
  - "plain": only the cross-attention context changes; the self-attention cache keeps the keys
    and values the past frames got under the old prompt.
  - "recache" (default): the self-attention cache is rebuilt from the clean latents of the frames
    written so far, under the new prompt, so the old prompt's semantics stop leaking forward.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

SWITCH_MODES = ("recache", "plain")


@dataclass(frozen=True)
class PromptSwitch:
    prompt: str
    mode: str = "recache"


class PromptSteering:
    """One run's mailbox for prompt switches (the latest posted switch wins)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: PromptSwitch | None = None

    @staticmethod
    def check(prompt: str, mode: str) -> None:
        """ValueError with a user-facing message for a switch that cannot be made."""
        if mode not in SWITCH_MODES:
            raise ValueError(f"switch mode must be one of {', '.join(SWITCH_MODES)}, got {mode!r}")
        if not prompt or not prompt.strip():
            raise ValueError("Please enter a prompt to switch to.")

    def post(self, prompt: str, mode: str = "recache") -> None:
        self.check(prompt, mode)
        with self._lock:
            self._pending = PromptSwitch(prompt.strip(), mode)

    def take(self) -> PromptSwitch | None:
        with self._lock:
            pending, self._pending = self._pending, None
        return pending


class ScriptedSteering(PromptSteering):
    """Switches known in advance, each before its block (the core asks take() once per block, in order): a replay's
    recorded switches, or a branch's history. After the first `scripted_blocks` blocks, `live` (when given) takes
    over, so a branch can be steered as it streams."""

    def __init__(self, switches: dict[int, PromptSwitch], scripted_blocks: int | None = None,
                 live: PromptSteering | None = None) -> None:
        super().__init__()
        self._switches, self._block = switches, 0
        self._scripted_blocks, self._live = scripted_blocks, live

    def take(self) -> PromptSwitch | None:
        block, self._block = self._block, self._block + 1
        if self._live is not None and self._scripted_blocks is not None and block >= self._scripted_blocks:
            return self._live.take()
        return self._switches.get(block)
