"""Rank 0 drives a split generator; the other ranks of its group replay each generator call on their share.

All control flow (the sampler, prompt switches, branches, live inputs, Stop) stays in rank 0's one
pipeline core. What the helper ranks must do alike is small: build the same prompt contexts and KV
caches (their heads' share) and run the same forward passes. Rank 0 announces each such call before
making it, over a gloo group (a small pickled header; helpers may wait there for hours between runs),
with the call's tensors over the data group (NCCL between GPUs). Objects are named by handles; when
rank 0's object is garbage-collected its handle is dropped on the helpers with the next call.
"""
from __future__ import annotations

import itertools
import logging
import threading
import weakref
from typing import Any

import torch
import torch.distributed as dist

from ..loading.lora import LoraChoice, LoraMerger
from ..model.kv_cache import AttentionWindow, KVCache
from ..model.transformer import CausalWanModel

log = logging.getLogger(__name__)


class Channel:
    """Calls from rank 0 to the helper ranks of the generator group: header over `control` (gloo), tensors
    over `data` on `device` (a CUDA device for NCCL, the CPU for gloo)."""

    def __init__(self, control: dist.ProcessGroup, data: dist.ProcessGroup, device: torch.device,
                 source: int = 0) -> None:
        self.control, self.data, self.device, self.source = control, data, device, source

    def send(self, op: str, meta: dict[str, Any], tensors: list[torch.Tensor | None] = ()) -> None:
        specs = [None if t is None else (tuple(t.shape), t.dtype) for t in tensors]
        dist.broadcast_object_list([(op, meta, specs)], src=self.source, group=self.control)
        for tensor in tensors:
            if tensor is not None:
                dist.broadcast(tensor.to(self.device).contiguous(), src=self.source, group=self.data)

    def receive(self) -> tuple[str, dict[str, Any], list[torch.Tensor | None]]:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=self.source, group=self.control)
        op, meta, specs = message[0]
        tensors = []
        for spec in specs:
            tensor = None
            if spec is not None:
                tensor = torch.empty(spec[0], dtype=spec[1], device=self.device)
                dist.broadcast(tensor, src=self.source, group=self.data)
            tensors.append(tensor)
        return op, meta, tensors


class MirroredContext(list):
    """A prompt's per-layer cross-attention keys/values on rank 0, and its handle on the helpers."""

    handle: int


class MirroredKVCache(KVCache):
    """Rank 0's share of a KV cache whose other shares live on the helpers under the same handle."""

    def __init__(self, mirror: "MirroredGenerator", handle: int, *settings: Any, **options: Any) -> None:
        super().__init__(*settings, **options)
        self.mirror, self.handle = mirror, handle

    def empty_like(self) -> "MirroredKVCache":
        return self.mirror.cache_like(self)

    def advance_to(self, start_token: int) -> None:
        self.mirror.announce("advance", handle=self.handle, token=start_token)
        super().advance_to(start_token)


class MirroredGenerator:
    """Rank 0's generator: every context, cache and forward pass is announced to the helpers, then made here on
    this rank's share. Anything else (config, dtype, weights for LoRAs) is the local model's."""

    def __init__(self, model: CausalWanModel, channel: Channel) -> None:
        self.model, self.channel = model, channel
        self._handles = itertools.count(1)
        self._dropped: list[int] = []
        self._lock = threading.Lock()  # (finalizers run on whichever thread collects)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def announce(self, op: str, tensors: list[torch.Tensor | None] = (), **meta: Any) -> None:
        with self._lock:
            meta["drop"], self._dropped = self._dropped, []
        self.channel.send(op, meta, list(tensors))

    def _tracked(self, obj: Any) -> int:
        handle = next(self._handles)
        weakref.finalize(obj, self._drop, handle)
        return handle

    def _drop(self, handle: int) -> None:
        with self._lock:
            self._dropped.append(handle)

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, context_kv: MirroredContext,
                 start_frame: int = 0, kv_cache: MirroredKVCache | None = None, attn_mask: Any = None,
                 token_bias: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(kv_cache, MirroredKVCache) or attn_mask is not None:
            raise ValueError("a generator split over ranks runs cached inference passes only")
        self.announce("forward", [latents, timesteps, token_bias], context=context_kv.handle,
                      start_frame=start_frame, cache=kv_cache.handle)
        return self.model(latents, timesteps, context_kv, start_frame=start_frame, kv_cache=kv_cache,
                          token_bias=token_bias)

    def encode_context(self, prompt_embeds: torch.Tensor) -> MirroredContext:
        context = MirroredContext()
        context.handle = self._tracked(context)
        self.announce("context", [prompt_embeds], handle=context.handle)
        context.extend(self.model.encode_context(prompt_embeds))
        return context

    def new_kv_cache(self, max_frames: int, frame_tokens: int, window: AttentionWindow, device: torch.device,
                     fp8: bool = False, batch: int = 1) -> MirroredKVCache:
        cache = MirroredKVCache(self, 0, *self.model.kv_cache_settings(max_frames, frame_tokens, window, device, fp8,
                                                                        batch))
        cache.handle = self._tracked(cache)
        self.announce("cache", handle=cache.handle, max_frames=max_frames, frame_tokens=frame_tokens,
                      window=window, fp8=fp8, batch=batch)
        return cache

    def cache_like(self, cache: MirroredKVCache) -> MirroredKVCache:
        _, batch, frames, frame_tokens, _, _, window, _, device, fp8 = cache._settings
        return self.new_kv_cache(frames, frame_tokens, window, device, fp8=fp8, batch=batch)

    def stop_helpers(self) -> None:
        self.announce("stop")


class MirroredLoras(LoraMerger):
    """LoRAs merged alike on every rank: the helpers are told once the files were read and checked here (a bad one
    is refused before any rank changes its weights)."""

    def __init__(self, mirror: MirroredGenerator) -> None:
        super().__init__(mirror.model)
        self.mirror = mirror

    def _weights_changing(self, choices: tuple[LoraChoice, ...]) -> None:
        self.mirror.announce("loras", choices=choices)
        super()._weights_changing(choices)


@torch.no_grad()
def serve_generator(model: CausalWanModel, channel: Channel, device: torch.device) -> None:
    """A helper rank's loop: replays rank 0's calls on this rank's share until told to stop."""
    objects: dict[int, Any] = {}
    loras = LoraMerger(model)
    while True:
        op, meta, tensors = channel.receive()
        for handle in meta.pop("drop"):
            objects.pop(handle, None)
        if op == "forward":
            latents, timesteps, bias = tensors
            model(latents, timesteps, objects[meta["context"]], start_frame=meta["start_frame"],
                  kv_cache=objects[meta["cache"]], token_bias=bias)
        elif op == "context":
            objects[meta["handle"]] = model.encode_context(tensors[0])
        elif op == "cache":
            handle = meta.pop("handle")
            objects[handle] = model.new_kv_cache(device=device, **meta)
        elif op == "advance":
            objects[meta["handle"]].advance_to(meta["token"])
        elif op == "loras":
            loras.activate(meta["choices"])
        elif op == "stop":
            log.info("generator helper: stopping")
            return
        else:
            raise ValueError(f"unknown call {op!r} from rank 0")
