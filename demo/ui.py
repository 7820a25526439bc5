"""The Gradio Blocks app: Text to Video, Image to Video and Pose Animation tabs on one core."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from pipelines.core import GenerationRequest, RequestError
from pipelines.weights import WeightsError

from .generation import parse_resolution, pick_seed, stream_video
from .media import MediaError, load_image, read_video
from .runtime import Runtime
from .session import SessionControl

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLE_PROMPTS = [
    "A corgi runs along a beach at sunset, waves rolling in, warm cinematic light",
    "Aerial shot over a neon-lit city at night in light rain, slow forward camera motion",
    "A red fox trots through fresh snow in a pine forest, soft morning light",
    "Close-up of coffee being poured into a glass cup, swirling cream, shallow depth of field",
]
POSE_HELP = ("Upload the character (reference image) and a driving video. DWPose (local ONNX files) extracts "
             "body, hand and face keypoints, aligns them to the character and renders the skeleton; or tick "
             "*already a pose video* to use a rendered skeleton video directly. The generator must have been "
             "trained with pose encoders: without such weights this tab says so instead of generating.")


class Controls:
    """The generation controls every tab shares, built inside the current tab."""

    def __init__(self, runtime: Runtime) -> None:
        cfg = runtime.config
        self.prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Describe the video …")
        self.negative = gr.Textbox(label="Negative prompt", value=cfg.negative_prompt, visible=cfg.uses_cfg)
        with gr.Row():
            self.seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
            self.randomize = gr.Checkbox(label="Randomize seed", value=True)
        with gr.Row():
            self.blocks = gr.Slider(1, cfg.max_blocks, value=cfg.num_blocks, step=1,
                                    label=f"Blocks ({cfg.frames_per_block} latent frames = "
                                          f"{4 * cfg.frames_per_block} video frames each)")
            self.fps = gr.Slider(8, 30, value=cfg.fps, step=1, label="Output FPS")
        self.resolution = gr.Dropdown(cfg.resolution_choices, value=cfg.resolution_choices[0],
                                      label="Resolution (width x height)")
        with gr.Row():
            self.generate = gr.Button("Generate", variant="primary")
            self.stop = gr.Button("Stop", variant="stop")

    @property
    def inputs(self) -> list:
        return [self.prompt, self.negative, self.seed, self.randomize, self.blocks, self.fps, self.resolution]


class Outputs:
    def __init__(self) -> None:
        self.stream = gr.Video(label="Live stream", streaming=True, autoplay=True, elem_id="live-stream")
        self.preview = gr.Image(label="Latest frame", elem_id="preview", interactive=False, height=240)
        self.status = gr.Markdown("Ready.", elem_id="status")
        self.video = gr.File(label="Download mp4", elem_id="download")
        self.seed = gr.Number(label="Seed used", precision=0, interactive=False)

    @property
    def all(self) -> list:
        return [self.stream, self.preview, self.status, self.video, self.seed]


def _request(prompt, negative, seed, randomize, blocks, resolution, **extra) -> GenerationRequest:
    height, width = parse_resolution(resolution)
    return GenerationRequest(prompt=prompt or "", negative_prompt=negative, seed=pick_seed(seed, randomize),
                             num_blocks=int(blocks), height=height, width=width, **extra)


def _pose_note(runtime: Runtime) -> str:
    if runtime.poser is not None and not runtime.poser.encoders.available:
        return f"**Not available with this model.** {runtime.poser.encoders.missing_message()}"
    if runtime.is_embedded_default:
        return POSE_HELP + " The embedded tiny model uses *random* pose encoders: it shows the plumbing only."
    return POSE_HELP


def build_demo(runtime: Runtime) -> gr.Blocks:
    def text_to_video(prompt, negative, seed, randomize, blocks, fps, resolution, session):
        request = _request(prompt, negative, seed, randomize, blocks, resolution)
        yield from stream_video(runtime, session, request, fps)

    def image_to_video(image, prompt, negative, seed, randomize, blocks, fps, resolution, session):
        if not image:
            raise gr.Error("Please upload an image.")
        try:
            picture = load_image(image)
        except MediaError as err:
            raise gr.Error(str(err)) from err
        request = _request(prompt, negative, seed, randomize, blocks, resolution, image=picture)
        yield from stream_video(runtime, session, request, fps)

    def pose_animation(reference, driving_video, is_pose_video, prompt, negative, seed, randomize, blocks, fps,
                       resolution, session):
        poser = runtime.poser
        if poser is None:
            raise gr.Error(runtime.load_error or "The model is not loaded.")
        if not poser.encoders.available:
            raise gr.Error(poser.encoders.missing_message())
        if not reference or not driving_video:
            raise gr.Error("Please upload a reference image and a driving video.")
        base = _request(prompt, negative, seed, randomize, blocks, resolution)
        try:
            picture, frames = load_image(reference), read_video(driving_video)
            with runtime.gpu_lock:
                request = poser.request(picture, frames, bool(is_pose_video), base)
        except (MediaError, WeightsError, RequestError) as err:
            raise gr.Error(str(err)) from err
        yield from stream_video(runtime, session, request, fps)

    def request_stop(session: SessionControl) -> str:
        session.stop_requested.set()
        return "Stopping after the current block …"

    with gr.Blocks(title="Self-Forcing streaming video") as demo:
        session = gr.State(SessionControl, delete_callback=lambda s: s.cleanup())
        gr.Markdown("# Streaming causal video diffusion (Self-Forcing · Wan2.1-T2V-1.3B)")
        gr.Markdown(runtime.banner(), elem_id="banner")
        with gr.Accordion("Memory (low-VRAM GPUs)", open=False):
            with gr.Row():
                profile = gr.Dropdown(["auto", "high", "medium", "low"], value="auto", label="Memory profile",
                                      info="low streams the generator's blocks from CPU memory for small GPUs; "
                                           "it applies to every user of this server")
                apply_profile = gr.Button("Apply")
            plan = gr.Markdown(runtime.memory_plan.summary() if runtime.memory_plan else "", elem_id="memory-plan")
            apply_profile.click(runtime.set_memory_profile, inputs=[profile], outputs=[plan],
                                concurrency_id="gpu", concurrency_limit=1, api_name="set_memory_profile")
        with gr.Tabs():
            with gr.Tab("Text to Video", id="t2v"):
                with gr.Row():
                    with gr.Column():
                        t2v = Controls(runtime)
                        gr.Examples([[p] for p in EXAMPLE_PROMPTS], inputs=[t2v.prompt])
                    with gr.Column():
                        t2v_out = Outputs()
            with gr.Tab("Image to Video", id="i2v"):
                with gr.Row():
                    with gr.Column():
                        image = gr.Image(label="First frame (resized and centre-cropped to the model size)",
                                         type="filepath", sources=["upload", "clipboard"])
                        i2v = Controls(runtime)
                        examples = sorted((ASSETS / "examples").glob("*.png"))
                        if examples:
                            gr.Examples([[str(p), p.stem.replace("_", " ")] for p in examples],
                                        inputs=[image, i2v.prompt])
                    with gr.Column():
                        i2v_out = Outputs()
            with gr.Tab("Pose Animation", id="pose"):
                gr.Markdown(_pose_note(runtime), elem_id="pose-note")
                with gr.Row():
                    with gr.Column():
                        reference = gr.Image(label="Reference image (the character)", type="filepath")
                        driving = gr.Video(label="Driving video or pose video")
                        is_pose_video = gr.Checkbox(label="The driving video is already a rendered pose video")
                        pose = Controls(runtime)
                    with gr.Column():
                        pose_out = Outputs()

        for controls, outputs, handler, extra, name in (
                (t2v, t2v_out, text_to_video, [], "text_to_video"),
                (i2v, i2v_out, image_to_video, [image], "image_to_video"),
                (pose, pose_out, pose_animation, [reference, driving, is_pose_video], "pose_animation")):
            controls.generate.click(handler, inputs=extra + controls.inputs + [session], outputs=outputs.all,
                                    api_name=name, concurrency_id="gpu", concurrency_limit=1)
            controls.stop.click(request_stop, inputs=[session], outputs=[outputs.status], queue=False,
                                api_name=f"stop_{name}")
            controls.prompt.submit(handler, inputs=extra + controls.inputs + [session], outputs=outputs.all,
                                   api_name=False, concurrency_id="gpu", concurrency_limit=1)
    return demo
