"""Decoding (and prompt encoding) on a rank of its own, while rank 0's generator goes on with the next block.

Rank 0 sends each block's latents to the decoding rank and gets its uint8 frames back; the decoder's
state (the VAE's causal conv cache, or the fast decoder's) lives there, one per run. All traffic with
that rank goes through one thread of rank 0 in order, so the generator never waits for a decode, and
generate() runs the block loop ahead of the frames (ahead_of_decoding) so the consumer (the browser
stream, its H.264 encoding) takes each block as its frames arrive. The same rank holds the text
encoder: prompts are encoded there and their embeddings sent back.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from ..loading.text_encoder import PromptEncoder
from ..loading.vae import WanVAE, uint8_frames_on_device

log = logging.getLogger(__name__)

DECODE, END_STREAM, ENCODE_PROMPT, STOP = 1, 2, 3, 4
HEADER_LENGTH = 8


class DecodeLink:
    """Point-to-point tensors between rank 0 and the decoding rank (on `device`: a GPU for NCCL, the CPU for
    gloo), each announced by a fixed-length int64 header."""

    def __init__(self, peer: int, group: dist.ProcessGroup, device: torch.device) -> None:
        self.peer, self.group, self.device = peer, group, device

    def send(self, tensor: torch.Tensor) -> None:
        dist.send(tensor.to(self.device).contiguous(), dst=self.peer, group=self.group)

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(tensor, src=self.peer, group=self.group)
        return tensor

    def send_header(self, *values: int) -> None:
        self.send(torch.tensor([*values, *[0] * (HEADER_LENGTH - len(values))], dtype=torch.int64))

    def receive_header(self) -> list[int]:
        return self.receive((HEADER_LENGTH,), torch.int64).tolist()


class RemoteDecoding:
    """Rank 0's side of the decoding rank. Calls queue on one thread that talks to it (in order)."""

    def __init__(self, link: DecodeLink, dtype: torch.dtype) -> None:
        self.link, self.dtype = link, dtype
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="decode-link")
        self._streams = itertools.count(1)
        self._stopped = False

    def stream(self, fast: bool, frame_by_frame: bool) -> "RemoteDecoderStream":
        return RemoteDecoderStream(self, next(self._streams), fast, frame_by_frame)

    def decode(self, stream: int, latents: torch.Tensor, fast: bool, frame_by_frame: bool) -> Future:
        return self._thread.submit(self._decode, stream, latents, fast, frame_by_frame)

    def end_stream(self, stream: int) -> None:
        """Frees a finished run's decoder state there (nothing to free once the rank stopped)."""
        if not self._stopped:
            self._thread.submit(self.link.send_header, END_STREAM, stream)

    def encode_prompt(self, text: str) -> torch.Tensor:
        return self._thread.submit(self._encode_prompt, text).result()

    def stop(self) -> None:
        self._stopped = True
        try:
            self._thread.submit(self.link.send_header, STOP).result()
        except RuntimeError:  # at interpreter exit the executor has already finished its thread: send from here
            self.link.send_header(STOP)
        self._thread.shutdown()

    def _decode(self, stream: int, latents: torch.Tensor, fast: bool,
                frame_by_frame: bool) -> tuple[np.ndarray, float]:
        _, channels, frames, height, width = latents.shape
        self.link.send_header(DECODE, stream, frames, channels, height, width, int(fast), int(frame_by_frame))
        self.link.send(latents.to(self.dtype))
        count, pixel_height, pixel_width, nanoseconds = self.link.receive_header()[:4]
        video = self.link.receive((count, pixel_height, pixel_width, 3), torch.uint8)
        return video.cpu().numpy(), nanoseconds / 1e9

    def _encode_prompt(self, text: str) -> torch.Tensor:
        data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
        self.link.send_header(ENCODE_PROMPT, 0, len(data))
        if len(data):
            self.link.send(data)
        shape = [size for size in self.link.receive_header() if size]
        return self.link.receive(tuple(shape), self.dtype)


class RemoteDecoderStream:
    """One run's decoder on the decoding rank: submit() returns a Future of (uint8 frames, decode seconds)."""

    def __init__(self, decoding: RemoteDecoding, stream: int, fast: bool, frame_by_frame: bool) -> None:
        self.decoding, self.stream, self.fast, self.frame_by_frame = decoding, stream, fast, frame_by_frame
        self.frames_seen = 0  # latent frames sent
        weakref.finalize(self, decoding.end_stream, stream)

    def submit(self, latents: torch.Tensor) -> Future:
        self.frames_seen += latents.shape[2]
        return self.decoding.decode(self.stream, latents, self.fast, self.frame_by_frame)


class RemotePromptEncoder(PromptEncoder):
    """The prompt encoder as rank 0 sees it: its tokenizer here (token counts and limits), its encoder model only on
    the decoding rank."""

    def __init__(self, tokenizer, text_len: int, decoding: RemoteDecoding) -> None:  # (no model to hold here)
        self.tokenizer, self.text_len, self.decoding, self.model = tokenizer, text_len, decoding, None

    def encode(self, prompt: str, device: torch.device | str | None = None) -> torch.Tensor:
        return self.decoding.encode_prompt(prompt).to(device or "cpu")


@torch.no_grad()
def serve_decoding(link: DecodeLink, vae: WanVAE, fast_decoder, prompt_encoder: PromptEncoder,
                   dtype: torch.dtype) -> None:
    """The decoding rank's loop: decodes blocks into their run's decoder state, encodes prompts, until stopped."""
    streams: dict[int, object] = {}
    while True:
        op, stream, *args = link.receive_header()
        if op == DECODE:
            frames, channels, height, width, fast, frame_by_frame = args[:6]
            latents = link.receive((1, channels, frames, height, width), dtype)
            if stream not in streams:
                streams[stream] = fast_decoder.stream() if fast else vae.stream(bool(frame_by_frame))
            start = time.perf_counter()
            video = uint8_frames_on_device(streams[stream].decode_block(latents))
            if video.is_cuda:
                torch.cuda.current_stream(video.device).synchronize()
            link.send_header(*video.shape[:3], int((time.perf_counter() - start) * 1e9))
            link.send(video)
        elif op == END_STREAM:
            streams.pop(stream, None)
        elif op == ENCODE_PROMPT:
            text = bytes(link.receive((args[0],), torch.uint8).cpu().tolist()).decode("utf-8") if args[0] else ""
            embeds = prompt_encoder.encode(text, link.device).to(dtype)
            link.send_header(*embeds.shape)
            link.send(embeds)
        elif op == STOP:
            log.info("decoding rank: stopping")
            return
        else:
            raise ValueError(f"unknown call {op} from rank 0")


def ahead_of_decoding(blocks: Iterator, ahead: int = 1) -> Iterator:
    """Runs the core's block loop on its own thread so it never waits for a block's frames; yields each result
    once its frames arrived (in order). The loop runs at most `ahead` results beyond those taken (it makes the next
    block while this one decodes and streams, never more), and closing the iterator stops it after the block under
    way."""
    results: queue.Queue = queue.Queue()
    permits = threading.Semaphore(ahead)
    closing = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for result in blocks:
                results.put(result)
                permits.acquire()
                if closing.is_set():
                    break
        except BaseException as err:  # (re-raised on the consumer's side)
            results.put(err)
        finally:
            blocks.close()
            results.put(done)

    thread = threading.Thread(target=produce, name="generate-ahead", daemon=True)
    thread.start()
    try:
        while (item := results.get()) is not done:
            permits.release()
            if isinstance(item, BaseException):
                raise item
            if item.pending is not None:
                item.pending()
            yield item
    finally:
        closing.set()
        permits.release()
        thread.join()
