"""Entry point (also the Hugging Face Space's app_file): python app.py [--config ...] [--weights DIR]"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import socket
import sys

from pipelines.cli_options import HelpFormatter, add_model_options, env

log = logging.getLogger("app")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python app.py", formatter_class=HelpFormatter,
                                     description="Streaming Self-Forcing video demo (Gradio).")
    add_model_options(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default=env("SF_HOST", "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"),
                        help="address to listen on [SF_HOST]")
    server.add_argument("--port", type=int, default=int(env("SF_PORT", "7860")), help="[SF_PORT]")
    server.add_argument("--outputs", default=env("SF_OUTPUTS_DIR", "outputs"),
                        help="folder for session videos (removed when a session or the server ends) and the "
                             "run-metrics log [SF_OUTPUTS_DIR]")
    server.add_argument("--output-cap-mb", type=float, default=float(env("SF_OUTPUT_CAP_MB", "2000")),
                        help="the oldest session videos are deleted beyond this total size [SF_OUTPUT_CAP_MB]")
    server.add_argument("--max-pixel-blocks", type=int, default=env("SF_MAX_PIXEL_BLOCKS"),
                        help="refuse fixed-length requests whose width x height x blocks exceeds this (a hosted "
                             "demo's cost per request; continuous runs stop at the config's continuous_minutes) "
                             "[SF_MAX_PIXEL_BLOCKS]")
    server.add_argument("--branch-memory-mb", type=float, default=float(env("SF_BRANCH_MEMORY_MB", "256")),
                        help="memory each visitor may use to keep blocks to branch from (about 1.2 MB a block at "
                             "832x480); older runs' blocks are dropped first [SF_BRANCH_MEMORY_MB]")
    server.add_argument("--admin-token", default=env("SF_ADMIN_TOKEN"),
                        help="lets whoever enters it change server-wide settings (memory profile) in the UI and "
                             "API; without it they are fixed at start [SF_ADMIN_TOKEN]")
    pool = parser.add_argument_group("worker pool (Ray Serve; without these flags the model runs in this process)")
    pool.add_argument("--workers", type=int, default=None,
                      help="start a pool of N workers, each with its own pipeline on its own GPU (one stream each)")
    pool.add_argument("--min-workers", type=int, default=None, help="autoscaling: the fewest workers (with --max-workers)")
    pool.add_argument("--max-workers", type=int, default=None,
                      help="autoscaling: grow the pool up to this many workers while visitors wait")
    pool.add_argument("--ray-address", default=env("RAY_ADDRESS"),
                      help="run the pool on an existing Ray cluster (e.g. 10.0.0.1:6379, after `ray start --head` "
                           "there); without it a local Ray instance is started [RAY_ADDRESS]")
    pool.add_argument("--gpus-per-worker", type=float, default=1.0,
                      help="GPUs each worker takes; a fraction packs several workers on one GPU")
    pool.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPU cores each worker takes")
    pool.add_argument("--stall-timeout", type=float, default=120.0,
                      help="seconds without a block after which a worker counts as lost and is replaced")
    return parser


def pool_options(args: argparse.Namespace):
    """The pool the flags ask for, or None (no pool: the model runs in this process)."""
    if args.workers is None and args.max_workers is None and not args.ray_address:
        return None
    from serving.pool.client import PoolOptions

    return PoolOptions(workers=args.workers or 1, min_workers=args.min_workers, max_workers=args.max_workers,
                       ray_address=args.ray_address or None, gpus_per_worker=args.gpus_per_worker,
                       cpus_per_worker=args.cpus_per_worker, stall_s=args.stall_timeout)


def remove_outputs_on_exit(store) -> None:
    """Session videos go at shutdown, also on SIGTERM (how Spaces and process managers stop servers)."""
    atexit.register(store.remove_sessions)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def port_in_use(host: str, port: int) -> bool:
    """Whether another program already listens on host:port (checked before minutes of model loading)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as the server binds: TIME_WAIT is free)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    if port_in_use(args.host, args.port):
        log.error("Port %d on %s is already in use (another app running?): start with --port %d, or stop the "
                  "other server.", args.port, args.host, args.port + 1)
        return 2
    from serving.zerogpu import adapt_arguments

    args = adapt_arguments(args)
    from demo.outputs import OutputStore  # heavy imports after parsing: --help stays instant
    from demo.ui import build_demo

    store = OutputStore(args.outputs, int(args.output_cap_mb * 1e6))
    remove_outputs_on_exit(store)
    model = dict(config_path=args.config, weights=args.weights, device=args.device, compile_models=args.compile,
                 use_ema=args.use_ema, memory_profile=args.memory_profile, vram_gb=args.vram_gb,
                 prompt_extender=args.prompt_extender, kv_cache=args.kv_cache, compile_cache=args.compile_cache,
                 attention=args.attention, fp8=args.fp8)
    options = pool_options(args)
    if options is not None and args.gpus > 1:
        log.error("--gpus splits one stream over this process's GPUs; a pool gives each worker a GPU of its own: "
                  "use one or the other.")
        return 2
    if options is None:
        from demo.runtime import load_runtime

        runtime = load_runtime(**model, gpus=args.gpus, split=args.split, outputs=store, admin_token=args.admin_token,
                               max_pixel_blocks=args.max_pixel_blocks, branch_memory_mb=args.branch_memory_mb)
    else:
        from serving.pool.client import PoolError

        try:
            runtime = start_pool(model, options, store, args)
        except (PoolError, ConnectionError) as err:
            log.error("%s", err)
            return 2
    demo = build_demo(runtime)
    demo.queue(max_size=32, default_concurrency_limit=1)
    # Only the session videos may be served: not the run log beside them, nor anything else on the server.
    serve(demo, runtime, args.host, args.port, [str(store.sessions)])
    return 0


def start_pool(model: dict, options, store, args: argparse.Namespace):
    """The front end of a worker pool: the workers load the model, this process only serves pages."""
    from demo.runtime import front_end
    from pipelines.loading.weights import WeightsError
    from serving.engine import resolve_weights_source
    from serving.pool.client import PoolBackend, engine_factory

    backend = PoolBackend(engine_factory(**model), options)
    atexit.register(backend.shutdown)
    try:  # (the front end only names the folder in messages; the workers report what they could load)
        weights_dir = resolve_weights_source(args.weights)
    except WeightsError:
        weights_dir = None
    return front_end(backend, weights_dir, store, args.admin_token, args.max_pixel_blocks,
                     branch_memory_mb=args.branch_memory_mb)


def serve(demo, runtime, host: str, port: int, allowed_paths: list[str]) -> None:
    make_server(demo, runtime, host, port, allowed_paths).run()


def make_server(demo, runtime, host: str, port: int, allowed_paths: list[str]):
    """The Gradio app at / and Prometheus metrics at /metrics, on one uvicorn server."""
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from demo.ui import CSS, PAGE_JS

    runtime.metrics.watch_queue(runtime.queue_length, runtime.backend.live_workers)
    app = FastAPI()
    app.add_api_route("/metrics", lambda: Response(generate_latest(runtime.metrics.registry),
                                                   media_type=CONTENT_TYPE_LATEST), methods=["GET"])
    app = gr.mount_gradio_app(app, demo, path="/", allowed_paths=allowed_paths, show_error=True,
                              css=CSS, js=PAGE_JS, footer_links=["api", "gradio", "settings"])
    log.info("serving on http://%s:%d (metrics at /metrics)", host, port)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # Open event streams (browsers, API clients) are cancelled after the grace period below;
            # uvicorn would log each cancellation as an application error with a traceback.
            logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
            await super().shutdown(sockets)

    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3))


if __name__ == "__main__":
    sys.exit(main())
