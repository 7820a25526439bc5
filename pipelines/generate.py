"""Command line: python -m pipelines.generate --config ... --prompt ... [--image ...] --out out.mp4"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .config import DEFAULT_CONFIG, load_config
from .core import GenerationRequest, RequestError
from .setup import build_pipeline, default_device, vram_bytes
from .video_io import H264Writer
from .weights import WeightsError

log = logging.getLogger("pipelines.generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generate a video with a causal (Self-Forcing) Wan2.1 model.")
    parser.add_argument("--config", default=os.environ.get("SF_CONFIG", str(DEFAULT_CONFIG)))
    parser.add_argument("--weights", default=os.environ.get("SF_WEIGHTS_DIR"), help="folder with the downloaded weights")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--image", type=Path, help="first frame (image-to-video)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blocks", type=int, help="number of 3-latent-frame blocks (7 = 81 frames)")
    parser.add_argument("--fps", type=int)
    parser.add_argument("--use-ema", action="store_true", help="load 'generator_ema' from the checkpoint")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--compile", action="store_true", help="torch.compile the models (CUDA; slow first run)")
    parser.add_argument("--memory-profile", choices=["auto", "high", "medium", "low"], default="auto")
    parser.add_argument("--vram-gb", type=float, help="plan for this much GPU memory instead of the free amount")
    parser.add_argument("--out", type=Path, default=Path("output.mp4"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        config = load_config(args.config, **{"weights.use_ema": args.use_ema or None, "dtype": args.dtype})
        pipeline, _ = build_pipeline(config, args.weights, args.device, args.memory_profile,
                                     vram_bytes(args.vram_gb), args.compile)
        image = Image.open(args.image) if args.image else None
    except WeightsError as err:
        log.error("%s", err)
        return 2
    except (OSError, UnidentifiedImageError) as err:
        log.error("Could not read the input: %s", err)
        return 2
    request = GenerationRequest(args.prompt, seed=args.seed, num_blocks=args.blocks,
                                negative_prompt=args.negative_prompt, image=image)
    fps = args.fps or config.fps
    writer = None
    progress = tqdm(total=request.num_blocks or config.num_blocks, unit="block")
    try:
        for result in pipeline.generate(request):
            if writer is None:
                writer = H264Writer(args.out, result.frames.shape[2], result.frames.shape[1], fps)
            writer.write(result.frames)
            progress.update(int(result.complete))
    except RequestError as err:
        log.error("%s", err)
        return 2
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    log.info("wrote %d frames to %s", writer.frames_written, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
