"""Entry point (also the Hugging Face Space's app_file): python app.py [--config ...] [--weights DIR]"""
from __future__ import annotations

import argparse
import logging
import os

from demo.runtime import load_runtime
from demo.ui import build_demo
from pipelines.config import DEFAULT_CONFIG


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Streaming Self-Forcing video demo")
    parser.add_argument("--config", default=os.environ.get("SF_CONFIG", str(DEFAULT_CONFIG)),
                        help="YAML in configs/ (default: the embedded tiny model)")
    parser.add_argument("--weights", default=os.environ.get("SF_WEIGHTS_DIR"),
                        help="folder with downloaded weights, or hf://owner/repo on a Space")
    parser.add_argument("--device", default=os.environ.get("SF_DEVICE"))
    parser.add_argument("--use-ema", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile on CUDA (first run compiles)")
    parser.add_argument("--memory-profile", choices=["auto", "high", "medium", "low"],
                        default=os.environ.get("SF_MEMORY_PROFILE", "auto"),
                        help="high: all on GPU; medium: text encoder streamed; low: generator streamed too")
    parser.add_argument("--vram-gb", type=float, help="plan for this much GPU memory instead of the free amount")
    parser.add_argument("--host", default=os.environ.get("SF_HOST", "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("SF_PORT", "7860")))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    runtime = load_runtime(args.config, args.weights, args.device, args.compile, args.use_ema,
                           args.memory_profile, args.vram_gb)
    demo = build_demo(runtime)
    demo.queue(max_size=32, default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
