"""Runs a producer generator ahead in a worker thread (own CUDA stream) so its GPU work overlaps
with what the consumer does with each item: here, denoising block k+1 while block k is decoded."""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, TypeVar

import torch

T = TypeVar("T")
_DONE = object()


def run_ahead(produce: Callable[[], Iterator[T]], device: torch.device, depth: int = 2) -> Iterator[tuple[T, object]]:
    """Yields (item, ready) for each item of produce(); `ready` is a CUDA event (or None on CPU) the
    consumer's stream must wait on before using the item. Closing the iterator stops the producer
    before its next item."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    cuda = device.type == "cuda"
    caller_stream = torch.cuda.current_stream(device) if cuda else None

    def worker() -> None:
        try:
            with torch.no_grad():
                if cuda:
                    stream = torch.cuda.Stream(device)
                    stream.wait_stream(caller_stream)  # see everything the caller enqueued before us
                    with torch.cuda.stream(stream):
                        _drain(produce(), stream)
                else:
                    _drain(produce(), None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            _put(exc)
        _put(_DONE)

    def _drain(iterator: Iterator[T], stream) -> None:
        for item in iterator:
            ready = None
            if stream is not None:
                ready = torch.cuda.Event()
                ready.record(stream)
            if not _put((item, ready)):
                iterator.close()
                return

    def _put(value) -> bool:
        while not stop.is_set():
            try:
                items.put(value, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    thread = threading.Thread(target=worker, name="denoise-ahead", daemon=True)
    thread.start()
    try:
        while True:
            value = items.get()
            if value is _DONE:
                return
            if isinstance(value, BaseException):
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
