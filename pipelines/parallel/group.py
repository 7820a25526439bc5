"""--gpus N: how a stream is split over N ranks, and the ranks' start.

The app (or CLI, or benchmark) process is rank 0: it serves, runs the pipeline core and its share of
the generator. It starts the other ranks itself (spawned processes, one per GPU: rank r on cuda:r;
on a CPU-only machine N processes over gloo, which is how the tests run) and they join it over
torch.distributed on 127.0.0.1 (NCCL between GPUs). Each helper builds only its part from the same
config and weights folder, then serves rank 0 until told to stop or rank 0 goes away.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.connection
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import PipelineConfig
from .layout import ParallelLayout

log = logging.getLogger(__name__)

IDLE_TIMEOUT = timedelta(days=30)  # helpers wait between runs for as long as the server lives
PARENT_POLL_S = 1.0


@dataclass(frozen=True)
class HelperSpec:
    """What every rank needs to join the group and build its part (sent to the spawned processes)."""

    layout: ParallelLayout
    config: PipelineConfig
    weights_dir: str | None
    cuda: bool
    compile_models: bool
    attention: str
    address: str

    def device(self, rank: int) -> torch.device:
        return torch.device("cuda", rank) if self.cuda else torch.device("cpu")


@dataclass
class Groups:
    """The process groups one rank belongs to (None where it is not a member or nothing is split)."""

    control: dist.ProcessGroup | None  # gloo, generator ranks: calls announced by rank 0
    data: dist.ProcessGroup | None  # generator ranks: tensors of the calls and the split passes
    pair: dist.ProcessGroup | None  # rank 0 and the decoding rank


def join(rank: int, spec: HelperSpec) -> Groups:
    """Joins the group as `rank`; every rank creates the same groups in the same order."""
    layout = spec.layout
    if spec.cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if spec.cuda else "gloo", init_method=spec.address, rank=rank,
                            world_size=layout.gpus, timeout=IDLE_TIMEOUT)
    generators = list(range(layout.generator_ranks))
    control = data = pair = None
    if len(generators) > 1:
        control = dist.new_group(generators, backend="gloo", timeout=IDLE_TIMEOUT)
        data = dist.new_group(generators, timeout=IDLE_TIMEOUT)
    if layout.decode_rank is not None:
        pair = dist.new_group([0, layout.decode_rank], timeout=IDLE_TIMEOUT)
    member = rank < len(generators)
    return Groups(control if member else None, data if member else None,
                  pair if rank in (0, layout.decode_rank) else None)


def free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def start_helpers(spec: HelperSpec) -> list[multiprocessing.Process]:
    """Spawns ranks 1..N-1 (they load their weights while rank 0 loads its own)."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=helper_main, args=(rank, spec, os.getpid()), name=f"sf-rank{rank}",
                                 daemon=True) for rank in range(1, spec.layout.gpus)]
    for process in processes:
        process.start()
    return processes


def helper_main(rank: int, spec: HelperSpec, parent: int) -> None:
    """A spawned rank: joins, builds its part, serves rank 0 until stopped."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s: %(message)s")
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    groups = join(rank, spec)
    device = spec.device(rank)
    try:
        if rank < spec.layout.generator_ranks:
            _serve_generator_share(rank, spec, groups, device)
        else:
            _serve_decoding(spec, groups, device)
    finally:
        dist.destroy_process_group()


def _exit_with_parent(parent: int) -> None:
    """A helper whose rank 0 died would wait for it forever (NCCL does not notice): it exits instead."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(0)


def _serve_generator_share(rank: int, spec: HelperSpec, groups: Groups, device: torch.device) -> None:
    from ..loading.weights import load_components
    from ..model.acceleration import compile_generator
    from ..model.attention_kernels import enable_attention_kernels
    from .mirror import Channel, serve_generator
    from .sequence import SequenceShard

    generator = load_components(spec.config, spec.weights_dir, "cpu").generator.to(device)
    generator.sequence_shard = SequenceShard(rank, spec.layout.generator_ranks, groups.data)
    enable_attention_kernels(generator, device, spec.attention)
    if spec.cuda:
        torch.backends.cudnn.benchmark = True
        if spec.compile_models:
            compile_generator(generator)
    log.info("rank %d: generator share ready on %s", rank, device)
    serve_generator(generator, Channel(groups.control, groups.data, device), device)


def _serve_decoding(spec: HelperSpec, groups: Groups, device: torch.device) -> None:
    from ..builder import load_tiny_decoder
    from ..loading.weights import load_components
    from ..model.acceleration import accelerate_decoder
    from .decode import DecodeLink, serve_decoding

    components = load_components(spec.config, spec.weights_dir, "cpu")
    components.vae.model.to(device)
    components.prompt_encoder.model.to(device)
    dtype = spec.config.torch_dtype
    fast = load_tiny_decoder(Path(spec.weights_dir) if spec.weights_dir else None, device, dtype)
    if spec.cuda:
        accelerate_decoder(components.vae.model, spec.compile_models)
    log.info("rank %d: decoder and text encoder ready on %s", spec.layout.decode_rank, device)
    serve_decoding(DecodeLink(0, groups.pair, device), components.vae, fast, components.prompt_encoder, dtype)


class ParallelGroup:
    """Rank 0's hold on the other ranks: start() spawns and joins them, attach() puts rank 0's components in the
    group (its generator share, the remote decoder and prompt encoder), close() stops them."""

    def __init__(self, spec: HelperSpec, processes: list[multiprocessing.Process], groups: Groups) -> None:
        self.spec, self.layout, self.processes, self.groups = spec, spec.layout, processes, groups
        self.mirror = None  # a mirror.MirroredGenerator when the generator is split
        self.decoding = None  # a decode.RemoteDecoding when another rank decodes
        self._closing = False
        threading.Thread(target=self._watch, name="parallel-watch", daemon=True).start()

    def lost(self, wait_s: float = 0.0) -> str | None:
        """Why this split stream cannot go on (a rank's process ended), or None while every rank runs. wait_s: after
        a failed collective, how long to give a dying rank's exit to register (the error can come first)."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, process in enumerate(self.processes, start=1):
                if process.exitcode is not None:
                    return (f"The process of GPU {rank} of this split stream stopped (exit code {process.exitcode}): "
                            f"restart the app to stream again.")
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _watch(self) -> None:
        """Notices a rank that dies. Between GPUs rank 0 could wait for it forever inside a collective (NCCL does
        not notice a dead peer before its timeout): the group is aborted, so that call fails and the run ends."""
        multiprocessing.connection.wait([process.sentinel for process in self.processes])
        if self._closing:
            return
        log.error("%s", self.lost())
        if self.spec.cuda:
            dist.distributed_c10d._abort_process_group()  # (torch's abort of a process group's communicators)

    @classmethod
    def start(cls, spec: HelperSpec) -> "ParallelGroup":
        processes = start_helpers(spec)
        try:
            groups = join(0, spec)
        except BaseException:
            for process in processes:
                process.terminate()
            raise
        log.info("parallel: %d ranks (%s)", spec.layout.gpus, spec.layout.describe())
        group = cls(spec, processes, groups)
        atexit.register(group.close)
        return group

    def attach(self, components, device: torch.device):
        """Makes rank 0's components (weights.Components, placed and compiled) its part of the group; returns the
        LoRA merger every rank follows (None when the generator is not split)."""
        from .decode import DecodeLink, RemoteDecoding, RemotePromptEncoder
        from .mirror import Channel, MirroredGenerator, MirroredLoras
        from .sequence import SequenceShard

        layout, groups, dtype = self.layout, self.groups, self.spec.config.torch_dtype
        if layout.decode_rank is not None:
            self.decoding = RemoteDecoding(DecodeLink(layout.decode_rank, groups.pair, device), dtype)
            local = components.prompt_encoder  # (its model is freed: only its tokenizer is used here)
            components.prompt_encoder = RemotePromptEncoder(local.tokenizer, local.text_len, self.decoding)
        if layout.generator_ranks == 1:
            return None
        generator = components.generator
        generator.sequence_shard = SequenceShard(0, layout.generator_ranks, groups.data)
        self.mirror = components.generator = MirroredGenerator(generator, Channel(groups.control, groups.data, device))
        return MirroredLoras(self.mirror)

    def close(self) -> None:
        """Stops the helpers and leaves the group (a new model starts a new one); once."""
        if not self.processes:
            return
        self._closing = True
        atexit.unregister(self.close)
        try:
            if self.lost() is None:  # (a broken group is only taken down)
                if self.mirror is not None:
                    self.mirror.stop_helpers()
                if self.decoding is not None:
                    self.decoding.stop()
        except (RuntimeError, dist.DistError) as err:  # (a rank died just now)
            log.warning("the other ranks could not be stopped in order: %s", err)
        finally:
            for process in self.processes:
                process.join(timeout=30)
                if process.is_alive():
                    process.terminate()
            self.processes = []
            dist.destroy_process_group()
            log.info("parallel group closed")
