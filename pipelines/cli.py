"""Command line: python -m pipelines.cli --prompt ... [--image ...] [--out out.mp4]"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from .cli_options import HelpFormatter, add_model_options, config_overrides
from .config import parse_resolution

log = logging.getLogger("pipelines.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.cli", formatter_class=HelpFormatter,
        description="Generate a video with a causal (Self-Forcing) Wan2.1 model and write it as an H.264 mp4.")
    add_model_options(parser)
    video = parser.add_argument_group("video")
    video.add_argument("--prompt", help="what the video shows (required unless --replay)")
    video.add_argument("--replay", type=Path, metavar="RUN.json",
                       help="make a recorded run again (the record the app or this command wrote beside its mp4): "
                            "the same frames when the same config, weights and options are loaded")
    video.add_argument("--extend-prompt", action="store_true",
                       help="rewrite the prompt into a detailed caption with the prompt extender first "
                            "(see --prompt-extender)")
    video.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                       help="merge a LoRA into the generator (repeatable; SCALE 0-2, default 1)")
    video.add_argument("--negative-prompt", help="used by multi-step (CFG) configs; default: the config's")
    video.add_argument("--image", type=Path, help="first frame (image-to-video)")
    video.add_argument("--seed", type=int, default=0, help="a whole number from 0 to 2**53 - 1")
    video.add_argument("--blocks", type=int, help="number of 3-latent-frame blocks (7 = 81 frames); "
                                                  "default: the config's num_blocks")
    video.add_argument("--resolution", help="WIDTHxHEIGHT, multiples of 16 (e.g. 832x480 or 480x832); "
                                            "default: the config's size")
    video.add_argument("--fps", type=int, help="frames per second of the mp4; default: the config's fps")
    video.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: the config's dtype")
    video.add_argument("--fast-decoder", action="store_true",
                       help="decode with the tiny TAEHV decoder (taew2_1.pth in the weights folder): faster, "
                            "preview quality")
    video.add_argument("--out", type=Path, default=Path("output.mp4"), help="the mp4 to write")
    return parser


def extended_prompt(args: argparse.Namespace, pipeline, plan) -> str:
    """The extender's rewrite of --prompt; the prompt as typed (with a warning) when there is none."""
    from .loading.prompt_extender import ExtenderError, PromptExtender, extender_device, find_extender_folder

    folder = find_extender_folder(Path(args.weights).expanduser() if args.weights else None, args.prompt_extender)
    if folder is None:
        log.warning("--extend-prompt: no prompt extender found (put an instruction-tuned causal LM in "
                    "<weights>/prompt_extender/ or pass --prompt-extender DIR); using the prompt as typed")
        return args.prompt
    try:
        text = PromptExtender(folder).extend(args.prompt, extender_device(pipeline.device, plan.profile.name))
    except ExtenderError as err:
        log.warning("%s; using the prompt as typed", err)
        return args.prompt
    log.info("extended prompt: %s", text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.prompt and not args.replay:
        parser.error("--prompt is required (or --replay RUN.json)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    # Heavy imports after parsing, so that --help and argument errors are instant.
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the blocks' bar below is the command's one progress bar
    from .builder import build_pipeline, default_device, vram_bytes
    from .config import load_config
    from .core import GenerationRequest, RequestError
    from .loading.lora import LoraChoice
    from .loading.video_io import write_video
    from .loading.weights import WeightsError
    from .run_record import RunRecorder, RunRecordError, read_record, replay_request

    try:
        height, width = parse_resolution(args.resolution) if args.resolution else (None, None)
        config = load_config(args.config, **config_overrides(args), dtype=args.dtype)
        pipeline, plan = build_pipeline(config, args.weights, args.device or default_device(), args.memory_profile,
                                     vram_bytes(args.vram_gb), args.compile, kv_cache=args.kv_cache,
                                     compile_cache=args.compile_cache, attention=args.attention, fp8=args.fp8,
                                     gpus=args.gpus, split=args.split)
        image = Image.open(args.image) if args.image else None
        if args.replay:
            record = read_record(args.replay)
            request = replay_request(record, pipeline, image, [LoraChoice.parse(text).path for text in args.lora])
            stop_after = len(record["blocks"])  # (a stopped or continuous run ends where it ended)
        else:
            request = GenerationRequest(args.prompt, seed=args.seed, num_blocks=args.blocks,
                                        negative_prompt=args.negative_prompt, image=image, height=height, width=width,
                                        loras=tuple(LoraChoice.parse(text) for text in args.lora),
                                        fast_decode=args.fast_decoder)
            stop_after = None
        request = pipeline.validate(request)
    except (WeightsError, RequestError, RunRecordError, ValueError) as err:
        log.error("%s", err)
        return 2
    except (OSError, UnidentifiedImageError) as err:
        log.error("Could not read the input: %s", err)
        return 2
    if args.extend_prompt and not args.replay:
        request = pipeline.validate(dataclasses.replace(request.request, prompt=extended_prompt(args, pipeline, plan)))
    progress = tqdm(total=stop_after or request.num_blocks, unit="block")
    recorder = RunRecorder(pipeline, request)

    def recorded_length_reached() -> bool:
        return stop_after is not None and len(recorder.record["blocks"]) >= stop_after

    def blocks():
        for result in pipeline.generate(request, cancel=recorded_length_reached):
            progress.update(int(result.complete))
            recorder.add(result)
            yield result.frames

    try:
        frames = write_video(args.out, blocks(), args.fps or config.fps)
    except RequestError as err:  # (a LoRA file that cannot be merged is found when the run starts)
        log.error("%s", err)
        return 2
    finally:
        progress.close()
    args.out.with_suffix(".json").write_text(recorder.json())
    log.info("wrote %d frames to %s (run record: %s)", frames, args.out, args.out.with_suffix(".json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
