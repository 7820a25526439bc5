"""Front-end runtimes over a pipeline the test built (the app builds them with load_runtime or a pool)."""
from __future__ import annotations

from demo.runtime import Runtime, front_end
from serving.backend import LocalBackend
from serving.engine import Engine

FRONT_END = ("outputs", "admin_token", "max_pixel_blocks", "branch_memory_mb")


def local_runtime(config, pipeline=None, **options) -> Runtime:
    """A Runtime whose model runs in this process; options name Engine fields or front-end settings."""
    front = {key: options.pop(key) for key in FRONT_END if key in options}
    return front_end(LocalBackend(Engine(config=config, device="cpu", pipeline=pipeline, **options)), **front)
