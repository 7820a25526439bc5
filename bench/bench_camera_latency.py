"""Movement-to-frame latency of live video-to-video (server side): frames arrive at the model's frame rate, as the
camera's stream delivers them, and each output frame is timed from the moment its input frame arrived to the moment
its restyled block was decoded. Output frame j is the restyling of input frame j (a block decodes to exactly the
frames it read), so no content detection is needed. The page's own round trip (a frame's upload, the block's
segment download) comes on top.

    python bench/bench_camera_latency.py --out bench/results/cpu_camera_latency.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import write_report  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.core import GenerationRequest, StreamingVideoPipeline  # noqa: E402
from pipelines.loading.weights import load_components  # noqa: E402
from pipelines.video_input import LiveFrames  # noqa: E402
from training.synthetic import SyntheticWorld, render  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--frames", type=int, default=129, help="input frames (33 per world clip, repeated)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    pipeline = StreamingVideoPipeline(load_components(config), config)
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
    threading.Thread(target=camera, daemon=True).start()
    latencies, block_first, block_last, shown = [], [], [], 0
    request = GenerationRequest("a green square moves up on a black background", seed=0, source=live, strength=0.3,
                                continuous=True)
    for result in pipeline.generate(request):
        now = time.perf_counter()
        delays = [now - pushed[shown + i] for i in range(len(result.frames))]
        latencies += delays
        if result.complete:
            block_first.append(delays[0])
            block_last.append(delays[-1])
        shown += len(result.frames)
    report = {"command": "python bench/bench_camera_latency.py --out " + str(args.out), "config": config.name,
              "device": "cpu", "fps_in": config.fps, "frames": shown, "strength": 0.3,
              "latency_s": {"median": round(statistics.median(latencies), 3), "max": round(max(latencies), 3),
                            "block_first_frame_median": round(statistics.median(block_first), 3),
                            "block_last_frame_median": round(statistics.median(block_last), 3)}}
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
