"""Entry point (also the Hugging Face Space's app_file): python app.py [--config ...] [--weights DIR]"""
from __future__ import annotations

import argparse
import logging
import os

from pipelines.cli_options import HelpFormatter, add_model_options, env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python app.py", formatter_class=HelpFormatter,
                                     description="Streaming Self-Forcing video demo (Gradio).")
    add_model_options(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default=env("SF_HOST", "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"),
                        help="address to listen on [SF_HOST]")
    server.add_argument("--port", type=int, default=int(env("SF_PORT", "7860")), help="[SF_PORT]")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    from demo.runtime import load_runtime  # heavy imports after parsing: --help stays instant
    from demo.ui import build_demo

    runtime = load_runtime(args.config, args.weights, args.device, args.compile, args.use_ema,
                           args.memory_profile, args.vram_gb)
    demo = build_demo(runtime)
    demo.queue(max_size=32, default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
