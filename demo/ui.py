"""The Gradio Blocks app: Text to Video, Image to Video and Pose Animation tabs on one core."""
from __future__ import annotations

import functools
from pathlib import Path

import gradio as gr
from PIL import Image

from pipelines.config import DemoConfig
from pipelines.memory.profiles import PROFILE_CHOICES
from pipelines.steering import SWITCH_MODES
from serving.engine import NO_LORA

from .handlers import MAX_FPS, MIN_FPS, Handlers, models_markdown
from .runtime import Runtime
from .session import SessionControl

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PROMPTS = [
    "A corgi runs along a beach at sunset, waves rolling in, warm cinematic light",
    "Aerial shot over a neon-lit city at night in light rain, slow forward camera motion",
    "A red fox trots through fresh snow in a pine forest, soft morning light",
    "Close-up of coffee being poured into a glass cup, swirling cream, shallow depth of field",
]
STATIC = Path(__file__).resolve().parent / "static"
PLAYED_KEEP_S = 10  # seconds of played video the live player keeps buffered (static/player_trim.js)


def page_script(name: str, **values: object) -> str:
    """A script from demo/static/ as the JavaScript function source Gradio runs (comment lines dropped,
    UPPERCASE placeholders filled in)."""
    lines = [line for line in (STATIC / name).read_text().splitlines() if not line.lstrip().startswith("//")]
    text = "\n".join(lines).strip()
    for key, value in values.items():
        text = text.replace(key, str(value))
    return text


PAGE_JS = (f"() => {{ ({page_script('browser_timing.js')})(); "
           f"({page_script('player_trim.js', KEEP=PLAYED_KEEP_S)})(); }}")
CSS = ".sf-hidden { display: none !important; }"
V2V_HELP = ("Restyles a video block by block: each block's frames (at the model's frame rate) are encoded, noised to "
            "the strength and denoised under the prompt, with the earlier output blocks in memory. The run ends "
            "with the video; Blocks caps its length.")
POSE_HELP = ("Upload the character (reference image) and a driving video. DWPose (local ONNX files) extracts "
             "body, hand and face keypoints, aligns them to the character and renders the skeleton; or tick "
             "*already a pose video* to use a rendered skeleton video directly. The generator must have been "
             "trained with pose encoders: without such weights this tab says so instead of generating.")


class ImageUpload(gr.Image):
    """gr.Image whose unreadable uploads reach the app's own checks (and their message) instead of
    failing inside Gradio's preprocessing with server paths in the error."""

    is_template = True  # rendered by the frontend's Image component

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except (OSError, ValueError, Image.DecompressionBombError):
            return payload.path


class CheckedSlider(gr.Slider):
    """gr.Slider whose API values reach the handler's own checks (one log line, the app's message)
    instead of Gradio's bounds error, which prints a traceback."""

    is_template = True  # rendered by the frontend's Slider component

    def preprocess(self, payload):
        return payload


class Controls:
    """The generation controls every tab shares, built inside the current tab."""

    def __init__(self, runtime: Runtime, tab: str) -> None:
        cfg, info = runtime.config, runtime.info
        self.prompt = gr.Textbox(label="Prompt", lines=1, max_lines=6, elem_id=f"prompt-{tab}",
                                 placeholder="Describe the video … (Enter generates)",
                                 info="Enter generates; long prompts wrap")
        with gr.Row():
            self.extend = gr.Checkbox(label="Extend prompt", value=info.extender, interactive=info.extender,
                                      info=info.extender_note)
        self.extended = gr.Textbox(value="", label="Extended prompt", lines=3, visible=info.extender,
                                   info="editable: generation uses this text while it belongs to the prompt above")
        with gr.Row():
            loras = list(info.lora_menu)
            # Custom values reach the handler, which refuses anything not in <weights>/loras with its own message.
            self.lora = gr.Dropdown([NO_LORA, *loras], value=NO_LORA, label="LoRA", interactive=bool(loras),
                                    allow_custom_value=True, info=info.lora_note)
            self.lora_strength = CheckedSlider(0, 2, value=1.0, step=0.05, label="LoRA strength")
        self.negative = gr.Textbox(label="Negative prompt", value=cfg.negative_prompt, visible=cfg.uses_cfg)
        with gr.Row():
            self.seed = gr.Number(label="Seed", value=0, step=1, info="a whole number from 0 to 2**53 - 1")
            self.randomize = gr.Checkbox(label="Randomize seed", value=True)
        with gr.Row():
            self.blocks = CheckedSlider(1, cfg.max_blocks, value=cfg.demo.blocks or cfg.num_blocks, step=1,
                                    label=f"Blocks ({cfg.frames_per_block} latent frames = "
                                          f"{cfg.video_frames_per_block} video frames each)")
            self.fps = CheckedSlider(MIN_FPS, MAX_FPS, value=cfg.fps, step=1, label="Output FPS")
        self.continuous = gr.Checkbox(label="Continuous", value=False,
                                      info=f"keep generating block after block (rolling attention window) until Stop "
                                           f"or {cfg.continuous_minutes:g} minutes of video; Blocks is ignored")
        fast = info.fast_decoder
        self.fast_decode = gr.Checkbox(label="Fast decoder (TAEHV, preview quality)", value=False, interactive=fast,
                                       info="decodes with the tiny taew2_1 decoder instead of the Wan VAE" if fast
                                       else "needs taew2_1.pth (github.com/madebyollin/taehv) in the weights folder")
        self.drift_guard = CheckedSlider(0, 1, value=0, step=0.05, label="Drift guard (0 = off)",
                                         info="re-cache from the first frames and the last block when a block's drift "
                                              "(plotted under the video) passes this; for continuous runs")
        self.resolution = gr.Dropdown(cfg.resolution_choices, value=cfg.resolution_choices[0], allow_custom_value=True,
                                      label="Resolution (width x height)", info="presets; the pipeline checks others")
        with gr.Row():
            self.generate = gr.Button("Generate", variant="primary", elem_id=f"generate-{tab}")
            self.stop = gr.Button("Stop", variant="stop", elem_id=f"stop-{tab}")
        self.redecode = gr.Button("Re-decode the last fast-decoded video with the full VAE", size="sm", visible=fast)
        with gr.Row():
            self.apply = gr.Button("Apply new prompt", size="sm")
            self.switch_mode = gr.Radio(list(SWITCH_MODES), value="recache", label="Prompt switch",
                                        info="while a video streams, Apply conditions it on the prompt above from "
                                             "its next block; recache also re-encodes the frames in its memory"
                                             + (f" ({cfg.demo.switch_note})" if cfg.demo.switch_note else ""))

    @property
    def inputs(self) -> list:
        return [self.prompt, self.negative, self.seed, self.randomize, self.blocks, self.fps, self.resolution,
                self.extend, self.extended, self.lora, self.lora_strength, self.continuous, self.fast_decode,
                self.drift_guard]


class Outputs:
    def __init__(self, tab: str, max_blocks: int) -> None:
        self.stream = gr.Video(label="Live stream", streaming=True, autoplay=True, elem_id=f"live-stream-{tab}")
        self.preview = gr.Image(label="Latest frame", elem_id=f"preview-{tab}", interactive=False, height=240)
        self.status = gr.Markdown("Ready.", elem_id=f"status-{tab}", label="Status")
        self.timing = gr.Markdown("", elem_id=f"browser-timing-{tab}")
        # The page writes its own click-to-first-frame time here (see BROWSER_TIMING_JS).
        self.report = gr.Textbox(elem_id=f"browser-report-{tab}", elem_classes=["sf-hidden"], show_label=False)
        self.video = gr.File(label="Download mp4", elem_id=f"download-{tab}")
        self.seed = gr.Number(label="Seed used", precision=0, interactive=False)
        self.timeline = gr.Markdown("", elem_id=f"timeline-{tab}", label="Prompt timeline")
        self.drift = gr.LinePlot(x="block", y="value", color="statistic", label="Drift", elem_id=f"drift-{tab}",
                                 height=220, x_title="block", y_title="relative to the first blocks")
        self.run_number = gr.Number(label="Run", visible=False, precision=0)  # (the run's number for /branch)
        self.branch = BranchPanel(tab, max_blocks)

    def all(self, controls: Controls) -> list:
        return [self.stream, self.preview, self.status, self.video, self.seed, controls.extended, self.timeline,
                self.run_number, self.drift]


class BranchPanel:
    """Go back to a block of one of this session's runs (while it streams or after) and continue from there."""

    def __init__(self, tab: str, max_blocks: int) -> None:
        with gr.Accordion("Branch: go back to a block and continue differently", open=False,
                          elem_id=f"branch-panel-{tab}"):
            self.run = gr.Dropdown([], value=None, label="Run", elem_id=f"branch-run-{tab}",
                                   info="this session's runs; a branch names the run and block it started from")
            with gr.Row():
                self.block = gr.Slider(2, max(3, max_blocks), value=2, step=1, label="From block", elem_id=f"branch-block-{tab}",
                                       info="the blocks before it are kept as they are")
                self.frame = gr.Image(label="Last frame before it", interactive=False, height=120,
                                      elem_id=f"branch-frame-{tab}")
            self.prompt = gr.Textbox(label="Prompt from that block", elem_id=f"branch-prompt-{tab}",
                                     placeholder="empty: the prompt in force there goes on")
            with gr.Row():
                self.new_seed = gr.Checkbox(label="New noise from that block", value=False)
                self.seed = gr.Number(label="Its seed (empty: random)", value=None, precision=0)
            self.button = gr.Button("Branch from this block", elem_id=f"branch-button-{tab}")
            self.tree = gr.Markdown("", elem_id=f"branch-tree-{tab}")


def demo_examples(demo: DemoConfig) -> tuple[list[list], list[list]]:
    """([image, prompt] image-to-video examples, [reference, pose video, True, prompt] pose examples)
    from the config's examples folder; a file's stem, underscores as spaces, is its prompt."""
    folder = ROOT / demo.examples_dir

    def prompt(path: Path) -> str:
        return path.stem.replace("_", " ")

    images = [[str(p), prompt(p)] for p in sorted(folder.glob("*.png"))]
    poses = [[str(p), str(p.with_suffix(".mp4")), True, prompt(p)] for p in sorted((folder / "pose").glob("*.png"))
             if p.with_suffix(".mp4").is_file()]
    return images, poses


def _pose_note(runtime: Runtime) -> str:
    info = runtime.info
    if info.loaded and info.pose_missing:
        return f"**Not available with this model.** {info.pose_missing}"
    note = POSE_HELP
    if runtime.config.demo.pose_note:
        note += f" {runtime.config.demo.pose_note}"
    missing = info.detector_missing
    if missing:
        note += f"\n\n*For driving videos of real people:* {missing}"
    return note


def build_demo(runtime: Runtime) -> gr.Blocks:
    handlers = Handlers(runtime)

    def new_session() -> SessionControl:  # (gr.State deep-copies its value: a plain function, not a method)
        return runtime.new_session()
    with gr.Blocks(title="Self-Forcing streaming video", delete_cache=(600, 3600)) as demo:
        session = gr.State(new_session, delete_callback=SessionControl.cleanup)
        gr.Markdown("# Streaming causal video diffusion (Self-Forcing · Wan2.1-T2V-1.3B)")
        banner = gr.Markdown(runtime.banner(), elem_id="banner")
        if runtime.info.weights_report is not None:
            with gr.Accordion("Weights folder (python -m pipelines.weights_inspector)",
                              open=not runtime.info.weights_runnable):
                gr.Markdown(runtime.info.weights_report, elem_id="weights-report")
        _memory_panel(runtime, handlers)
        _model_panel(runtime, handlers, banner)
        images, pose_examples = demo_examples(runtime.config.demo)
        with gr.Tabs():
            with gr.Tab("Text to Video", id="t2v"):
                with gr.Row():
                    with gr.Column():
                        t2v = Controls(runtime, "t2v")
                        gr.Examples([[p] for p in runtime.config.demo.prompts or EXAMPLE_PROMPTS],
                                    inputs=[t2v.prompt])
                        with gr.Accordion("Replay a run record", open=False):
                            record_file = gr.File(label="run.json (written beside every video)", type="filepath",
                                                  file_types=[".json"], elem_id="replay-record")
                            replay = gr.Button("Replay", elem_id="replay-button")
                    with gr.Column():
                        t2v_out = Outputs("t2v", runtime.config.max_blocks)
            with gr.Tab("Image to Video", id="i2v"):
                with gr.Row():
                    with gr.Column():
                        image = ImageUpload(label="First frame (resized and centre-cropped to the model size)",
                                            type="filepath", sources=["upload", "clipboard"])
                        i2v = Controls(runtime, "i2v")
                        if images:
                            gr.Examples(images, inputs=[image, i2v.prompt])
                    with gr.Column():
                        i2v_out = Outputs("i2v", runtime.config.max_blocks)
            with gr.Tab("Pose Animation", id="pose"):
                gr.Markdown(_pose_note(runtime), elem_id="pose-note")
                with gr.Row():
                    with gr.Column():
                        reference = ImageUpload(label="Reference image (the character)", type="filepath")
                        driving = gr.Video(label="Driving video or pose video")
                        is_pose_video = gr.Checkbox(label="The driving video is already a rendered pose video")
                        with gr.Row():
                            pose_camera = gr.Image(label="Camera (live driving)", sources=["webcam"], streaming=True,
                                                   type="numpy", elem_id="pose-camera", height=200)
                            pose_use_camera = gr.Checkbox(label="Drive with the camera (live, until Stop)", value=False,
                                                          elem_id="pose-use-camera",
                                                          info="start the camera's stream, then Generate; the first "
                                                               "frames set the alignment to the character")
                        pose = Controls(runtime, "pose")
                        if pose_examples:
                            gr.Examples(pose_examples, inputs=[reference, driving, is_pose_video, pose.prompt])
                    with gr.Column():
                        pose_out = Outputs("pose", runtime.config.max_blocks)

            with gr.Tab("Video to Video", id="v2v"):
                gr.Markdown(V2V_HELP, elem_id="v2v-note")
                with gr.Row():
                    with gr.Column():
                        source_video = gr.Video(label="Input video (a file, or record one with the camera)",
                                                sources=["upload", "webcam"], elem_id="v2v-input")
                        with gr.Row():
                            camera = gr.Image(label="Camera (live input)", sources=["webcam"], streaming=True,
                                              type="numpy", elem_id="v2v-camera", height=200)
                            use_camera = gr.Checkbox(label="Use the camera (live, until Stop)", value=False,
                                                     elem_id="v2v-use-camera",
                                                     info="start the camera's stream, then Generate")
                        strength = CheckedSlider(0.05, 1, value=0.6, step=0.05, label="Strength",
                                                 info="how much of each input block is replaced by noise: low keeps "
                                                      "the input's colours and motion, 1 follows the prompt alone")
                        v2v = Controls(runtime, "v2v")
                    with gr.Column():
                        v2v_out = Outputs("v2v", runtime.config.max_blocks)

        _stats_panel(runtime)
        for tab, controls, outputs, handler, extra, name in (
                ("t2v", t2v, t2v_out, handlers.text_to_video, [], "text_to_video"),
                ("i2v", i2v, i2v_out, handlers.image_to_video, [image], "image_to_video"),
                ("pose", pose, pose_out, handlers.pose_animation, [reference, driving, is_pose_video, pose_use_camera],
                 "pose_animation"),
                ("v2v", v2v, v2v_out, handlers.video_to_video, [source_video, strength, use_camera], "video_to_video")):
            generate = dict(inputs=extra + controls.inputs + [session], outputs=outputs.all(controls),
                            concurrency_id="gpu", concurrency_limit=runtime.backend.concurrency)
            # The API endpoint: a refused request is an error for API callers.
            gr.Button(visible=False).click(handler, api_name=name, **generate)
            # The page announces a request before it joins the queue, so Stop and new prompts reach it there, and
            # shows a refusal in the status line.
            on_page = handlers.calm(handler)
            controls.generate.click(handlers.request_sent, inputs=[session], queue=False, api_name=False,
                                    show_progress="hidden", js=page_script("click.js", TAB=tab)
                                    ).then(on_page, api_name=False, **generate)
            # Enter applies the new prompt to this session's running video, and generates otherwise.
            controls.prompt.submit(handlers.steer_if_running, inputs=[controls.prompt, controls.switch_mode, session],
                                   outputs=[outputs.status], queue=False, api_name=False)
            controls.prompt.submit(handlers.send_unless_running, inputs=[session], queue=False, api_name=False,
                                   show_progress="hidden").success(on_page, api_name=False, **generate)
            controls.stop.click(handlers.request_stop, inputs=[session], outputs=[outputs.status], queue=False,
                                api_name=f"stop_{name}")
            if runtime.info.fast_decoder:
                controls.redecode.click(handlers.redecode, inputs=[session], outputs=[outputs.video, outputs.status],
                                        concurrency_id="gpu", concurrency_limit=runtime.backend.concurrency,
                                        api_name=f"redecode_{name}")
            controls.apply.click(handlers.steer, inputs=[controls.prompt, controls.switch_mode, session],
                                 outputs=[outputs.status], queue=False, api_name=f"steer_{name}")
            outputs.report.change(handlers.report_browser_timing, inputs=[outputs.report, session],
                                  outputs=[outputs.timing], queue=False, api_name=False)
            _wire_branch_panel(handlers, session, tab, controls, outputs, generate)
        for feed in (camera, pose_camera):  # (a session runs one stream at a time: one camera feed)
            feed.stream(handlers.camera_frame, inputs=[feed, session], outputs=None, stream_every=1 / runtime.config.fps,
                        concurrency_limit=None, show_progress="hidden", api_name=False)
        replaying = dict(inputs=[record_file, t2v.fps, session], outputs=t2v_out.all(t2v), concurrency_id="gpu",
                         concurrency_limit=runtime.backend.concurrency)
        gr.Button(visible=False).click(handlers.replay_run, api_name="replay_run", **replaying)
        replay.click(handlers.request_sent, inputs=[session], queue=False, api_name=False, show_progress="hidden"
                     ).then(handlers.calm(handlers.replay_run), api_name=False, **replaying)
        demo.unload(handlers.end_session)
    _hide_internal_endpoints(demo, new_session)
    return demo


def _wire_branch_panel(handlers: Handlers, session: gr.State, tab: str, controls: Controls, outputs: Outputs,
                       generate: dict) -> None:
    """The branch panel's events; on the first tab also the /branch and /rewind endpoints (for any tab's runs)."""
    panel = outputs.branch
    outputs.run_number.change(functools.partial(handlers.run_menu, tab), inputs=[outputs.run_number, session],
                              outputs=[panel.run], queue=False, api_name=False)
    panel.run.change(handlers.select_run, inputs=[panel.run, session], outputs=[panel.block, panel.frame, panel.tree],
                     queue=False, api_name=False)
    panel.block.change(handlers.block_frame, inputs=[panel.run, panel.block, session], outputs=[panel.frame],
                       queue=False, api_name=False)
    branching = dict(generate, inputs=[panel.run, panel.block, panel.prompt, controls.switch_mode, panel.new_seed,
                                       panel.seed, controls.fps, session])
    panel.button.click(handlers.branch_requested, inputs=[session], queue=False, api_name=False,
                       show_progress="hidden").then(handlers.calm(handlers.branch), api_name=False, **branching)
    if tab == "t2v":  # (the API takes plain numbers: a run of any tab)
        run, block, seed = (gr.Number(label=label, visible=False, precision=0)
                            for label in ("Run", "From block", "New seed (empty: random)"))
        gr.Button(visible=False).click(handlers.branch, api_name="branch", **dict(
            branching, inputs=[run, block, panel.prompt, controls.switch_mode, panel.new_seed, seed, controls.fps,
                               session]))
        gr.Button(visible=False).click(handlers.rewind, api_name="rewind", **dict(
            generate, inputs=[run, block, seed, controls.fps, session]))


def _memory_panel(runtime: Runtime, handlers: Handlers) -> None:
    """The memory plan for everyone; changing it (server-wide) only with the operator's admin token."""
    with gr.Accordion("Memory (low-VRAM GPUs)", open=False):
        plan = gr.Markdown(runtime.info.memory_summary, elem_id="memory-plan")
        if runtime.backend.pooled:
            gr.Markdown("Pool mode: every worker keeps the profile the pool was started with (`--memory-profile`).")
            return
        if runtime.admin_token is None:
            gr.Markdown("The operator sets the profile at start (`--memory-profile`); start with "
                        "`--admin-token TOKEN` to change it here.")
            return
        with gr.Row():
            profile = gr.Dropdown(PROFILE_CHOICES, value="auto", label="Memory profile",
                                  info="applies to every user of this server")
            token = gr.Textbox(label="Admin token", type="password")
            apply = gr.Button("Apply")
        apply.click(handlers.set_memory_profile, inputs=[profile, token], outputs=[plan], concurrency_id="gpu",
                    concurrency_limit=1, api_name="set_memory_profile")


def _model_panel(runtime: Runtime, handlers: Handlers, banner: gr.Markdown) -> None:
    """Pick among the registered models present in the weights folder (one resident at a time)."""
    with gr.Accordion("Model", open=False):
        table = gr.Markdown(models_markdown(runtime), elem_id="models")
        present = runtime.available_models()
        if runtime.backend.pooled:
            gr.Markdown("Pool mode: every worker runs the model the pool was started with (`--config`).")
            return
        if runtime.admin_token is None or not present:
            gr.Markdown("Start with `--config NAME` (or `--admin-token TOKEN` to switch here) to use another model."
                        if present else "Put a model's files in the weights folder (`--weights DIR`) to use it.")
            return
        with gr.Row():
            choice = gr.Dropdown([(m.label, m.key) for m in present], value=present[0].key, label="Model",
                                 info="replaces the loaded model for every user of this server")
            token = gr.Textbox(label="Admin token", type="password")
            switch = gr.Button("Switch")
        switch.click(handlers.switch_model, inputs=[choice, token], outputs=[banner, table], concurrency_id="gpu",
                     concurrency_limit=1, api_name="switch_model")


def _stats_panel(runtime: Runtime) -> None:
    """The last runs of this server and their p50/p95 (from the metrics log; no prompts are logged)."""
    with gr.Accordion("Stats", open=False) as accordion:
        table = gr.Markdown(elem_id="stats")
        refresh = gr.Button("Refresh", size="sm")
    for event in (accordion.expand, refresh.click):
        event(runtime.metrics.summary_markdown, outputs=[table], queue=False, api_name=False)


def _hide_internal_endpoints(demo: gr.Blocks, session_factory) -> None:
    """The per-session state's initialiser is a load event, not something for API users (Gradio gives a
    callable State's load event no api_visibility argument)."""
    for fn in demo.fns.values():
        if fn.fn is session_factory:
            fn.api_visibility = "private"
