"""Movement-to-frame latency of live video-to-video (server side): frames arrive at the model's frame rate, as the
camera's stream delivers them, and each output frame is timed from the moment its input frame arrived to the moment
its restyled block was decoded. Output frame j is the restyling of input frame j (a block decodes to exactly the
frames it read), so no content detection is needed. The page's own round trip (a frame's upload, the block's
segment download) comes on top.

    python bench/bench_camera_latency.py --out bench/results/cpu_camera_latency.json
    python bench/bench_camera_latency.py --full-size --config configs/self_forcing_dmd.yaml --strength 0.5 \
        --out bench/results/h200_camera_latency_compiled.json    # a GPU: full Wan2.1-T2V-1.3B size, random weights,
                                                                  # compiled as the app runs it
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import write_report  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.core import GenerationRequest, StreamingVideoPipeline  # noqa: E402
from pipelines.loading.weights import load_components  # noqa: E402
from pipelines.video_input import FrameList, LiveFrames  # noqa: E402
from training.synthetic import SyntheticWorld, render  # noqa: E402


def full_size_pipeline(config) -> StreamingVideoPipeline:
    """The config's model at full size with random weights on the GPU, compiled with the app's fast kernels."""
    from bench.bench_streaming import build_components
    from pipelines.builder import warm_up
    from pipelines.model.acceleration import accelerate
    from pipelines.settings import RuntimeSettings

    device = torch.device("cuda")
    torch.manual_seed(0)
    components = build_components(config, device, config.torch_dtype)
    accelerate(components, compile_models=True)
    pipeline = StreamingVideoPipeline(components, config, device, RuntimeSettings(compiled=True))
    warm_up(pipeline)
    return pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--frames", type=int, default=129, help="input frames (33 per world clip, repeated)")
    parser.add_argument("--strength", type=float, default=0.3)
    parser.add_argument("--full-size", action="store_true",
                        help="on the GPU: the config's full-size model with random weights, compiled (bench_streaming's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    pipeline = full_size_pipeline(config) if args.full_size else \
        StreamingVideoPipeline(load_components(config), config)
    world = SyntheticWorld(0, frames=33)
    clips = [render(world.held_out_scene(i, size=(config.height, config.width))) for i in range(4)]
    frames = [frame for clip in clips for frame in clip][:args.frames]
    live, pushed = LiveFrames(timeout_s=2.0), []

    def camera() -> None:
        start = time.perf_counter()
        for index, frame in enumerate(frames):
            time.sleep(max(0.0, start + index / config.fps - time.perf_counter()))
            pushed.append(time.perf_counter())
            live.push(frame)
        live.close()

    list(pipeline.generate(GenerationRequest("warm-up", num_blocks=1)))
    list(pipeline.generate(GenerationRequest("warm-up", source=FrameList(frames), strength=args.strength,
                                             num_blocks=min(3, config.max_blocks))))  # (the encoder's shapes)
    threading.Thread(target=camera, daemon=True).start()
    latencies, block_first, block_last, shown = [], [], [], 0
    request = GenerationRequest("a green square moves up on a black background", seed=0, source=live,
                                strength=args.strength, continuous=True)
    started = time.perf_counter()
    for result in pipeline.generate(request):
        now = time.perf_counter()
        delays = [now - pushed[shown + i] for i in range(len(result.frames))]
        latencies += delays
        if result.complete:
            block_first.append(delays[0])
            block_last.append(delays[-1])
        shown += len(result.frames)
    elapsed = time.perf_counter() - started
    device = torch.cuda.get_device_name() if pipeline.device.type == "cuda" else "cpu"
    report = {"command": "python " + " ".join(sys.argv), "config": config.name, "device": device,
              "height": config.height, "width": config.width, "fps_in": config.fps, "frames": shown,
              "strength": args.strength, "blocks": len(block_first),
              "blocks_per_s": round(len(block_first) / elapsed, 2),
              "latency_s": {"median": round(statistics.median(latencies), 3), "max": round(max(latencies), 3),
                            "block_first_frame_median": round(statistics.median(block_first), 3),
                            "block_last_frame_median": round(statistics.median(block_last), 3)}}
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
