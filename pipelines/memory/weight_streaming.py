"""Per-block weight streaming: run a stack of identical blocks from pinned CPU memory.

BlockStreamer keeps a ModuleList's weights in pinned CPU memory and copies each block into one
of two GPU slots just before it runs, on a side CUDA stream, while the previous block computes
(the idea of FramePack's DynamicSwapInstaller, done with double buffering). Outputs are
bit-identical to the resident model: the same weights are used, only their location moves.
When memory allows, the first `resident` blocks simply stay on the GPU and only the rest stream
(less copying per forward pass).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


class BlockStreamer:
    """Streams the weights of `blocks` (identical modules) to `device` one block at a time; blocks
    before index `resident` stay on the device."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device | str, resident: int = 0) -> None:
        self.blocks = blocks
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.resident = min(resident, len(blocks) - 1)
        self.names = [name for name, _ in blocks[0].named_parameters()]
        self.masters: list[list[torch.Tensor] | None] = []  # pinned CPU weights of each streamed block
        for index, block in enumerate(blocks):
            if index < self.resident:
                block.to(self.device)
                self.masters.append(None)
                continue
            tensors = [p.data.to("cpu") for _, p in block.named_parameters()]
            self.masters.append([t.pin_memory() if self.cuda else t for t in tensors])
            self._bind(block, self.masters[-1])
        streamed = self.masters[self.resident]
        self.slots = [[torch.empty_like(t, device=self.device) for t in streamed] for _ in range(2)]
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.ready: list[torch.cuda.Event | None] = [None, None]
        self.freed: list[torch.cuda.Event | None] = [None, None]
        self.loaded: dict[int, int] = {}  # block index -> slot holding its weights
        self.current_slot = 1
        self._hooks = []
        for index, block in enumerate(blocks):
            if index < self.resident:
                continue
            self._hooks.append(block.register_forward_pre_hook(self._pre_hook(index)))
            self._hooks.append(block.register_forward_hook(self._post_hook(index)))

    def _bind(self, block: nn.Module, tensors: list[torch.Tensor]) -> None:
        params = dict(block.named_parameters())
        for name, tensor in zip(self.names, tensors):
            params[name].data = tensor

    def _load(self, index: int, slot: int) -> None:
        """Copies block `index` into `slot` once the slot's previous user has finished."""
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                if self.freed[slot] is not None:
                    self.copy_stream.wait_event(self.freed[slot])
                for dst, src in zip(self.slots[slot], self.masters[index]):
                    dst.copy_(src, non_blocking=True)
                self.ready[slot] = torch.cuda.Event()
                self.ready[slot].record(self.copy_stream)
        else:
            for dst, src in zip(self.slots[slot], self.masters[index]):
                dst.copy_(src)
        self.loaded[index] = slot

    def begin(self, index: int) -> None:
        slot = self.loaded.pop(index, None)
        if slot is None:
            slot = 1 - self.current_slot
            self._load(index, slot)
            self.loaded.pop(index)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        self._bind(self.blocks[index], self.slots[slot])
        self.current_slot = slot  # blocks run one at a time: this is the running block's slot
        following = index + 1 if index + 1 < len(self.blocks) else self.resident  # (the next pass's first)
        if following != index and following not in self.loaded:
            self._load(following, 1 - slot)

    def end(self, index: int) -> None:
        slot = self.current_slot
        if self.cuda:
            self.freed[slot] = torch.cuda.Event()
            self.freed[slot].record(torch.cuda.current_stream(self.device))
        self._bind(self.blocks[index], self.masters[index])

    @contextlib.contextmanager
    def use(self, index: int) -> Iterator[nn.Module]:
        """Block `index` with its weights on the device, for calls that bypass forward()."""
        if index < self.resident:
            yield self.blocks[index]
            return
        self.begin(index)
        try:
            yield self.blocks[index]
        finally:
            self.end(index)

    def _pre_hook(self, index: int) -> Callable:
        def hook(module, args):
            self.begin(index)
        return hook

    def _post_hook(self, index: int) -> Callable:
        def hook(module, args, output):
            self.end(index)
        return hook

    def invalidate(self) -> None:
        """The CPU masters changed (a LoRA was merged): drop copies prefetched from the old values."""
        if self.cuda:
            torch.cuda.synchronize(self.device)  # no copy may still be reading the masters
        self.loaded.clear()

    def remove(self) -> None:
        """Uninstalls the hooks; weights go back into the (CPU) modules as ordinary tensors."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for handle in self._hooks:
            handle.remove()
        for block, tensors in zip(self.blocks, self.masters):
            if tensors is None:
                block.to("cpu")  # a resident block (LoRA merges went to its device copy)
            else:
                self._bind(block, tensors)
        self.slots = []
        self.loaded.clear()
