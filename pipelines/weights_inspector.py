"""Weights inspector: what a folder holds and whether this app can run it.

    python -m pipelines.weights_inspector DIR [--json]

Models are recognised from their files, configs and tensor shapes (safetensors headers, memory-
mapped torch files), never by loading them. For each find: supported or not and why, what is
missing and where to get it, and for runnable generators the GPU memory each profile needs.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import PROJECT_ROOT, PipelineConfig, load_config
from .loading.sources import SELF_FORCING_REPO, T5_FILE, WAN_REPO
from .memory.profiles import GIB
from .pose.extract import DETECTOR_FILE, DWPOSE_REPO, POSE_FILE

log = logging.getLogger(__name__)

DWPOSE_FILES = (DETECTOR_FILE, POSE_FILE)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# Architectures by (width, depth, latent channels in): the public Wan releases.
KNOWN_TRANSFORMERS = {
    (1536, 30, 16): "Wan2.1 T2V 1.3B",
    (5120, 40, 16): "Wan2.1 T2V 14B",
    (5120, 40, 36): "Wan2.1 I2V 14B",
    (3072, 30, 48): "Wan2.2 TI2V 5B",
}


@dataclass
class Finding:
    path: str  # relative to the inspected folder
    kind: str
    supported: bool
    detail: str
    missing: list[str] = field(default_factory=list)
    vram_gib: dict[str, float] | None = None  # memory profile -> estimated peak at the config's default size
    config: str | None = None  # the configs/ file that runs it


@dataclass
class Report:
    folder: str
    findings: list[Finding]

    @property
    def runnable(self) -> list[Finding]:
        return [f for f in self.findings if f.supported and f.kind.startswith("causal generator") and not f.missing]

    def verdict(self) -> str:
        if self.runnable:
            best = self.runnable[0]
            if best.kind.startswith("causal generator bundled"):
                return f"Runs with: python app.py --config {best.config} (its own folder: no --weights needed)"
            return f"Runs with: python app.py --config {best.config} --weights {self.folder}"
        needs = sorted({m for f in self.findings for m in f.missing}) or [
            f"a Wan2.1 base ({WAN_REPO}) and a causal generator (self_forcing_dmd.pt from {SELF_FORCING_REPO})"]
        return "Cannot run a video model from this folder yet. Missing: " + "; ".join(needs)

    def text(self) -> str:
        lines = [f"Weights folder {self.folder}", ""]
        for f in self.findings:
            mark = "OK " if f.supported and not f.missing else "-- " if not f.supported else "!! "
            lines.append(f"{mark}{f.path}: {f.kind}")
            lines.append(f"     {f.detail}")
            lines += [f"     missing: {m}" for m in f.missing]
            if f.vram_gib:
                lines.append("     estimated peak GPU memory for the config's default video: " +
                             ", ".join(f"{name} {gib:.1f} GiB" for name, gib in f.vram_gib.items()))
        if not self.findings:
            lines.append("(nothing this app recognises)")
        lines += ["", self.verdict()]
        return "\n".join(lines)

    def markdown(self) -> str:
        """Short form for the app's banner."""
        rows = [f"- {'✅' if f.supported and not f.missing else '⚠️' if f.supported else '✖️'} `{f.path}`: {f.kind}"
                + (f" (missing: {'; '.join(f.missing)})" if f.missing else "")
                + ("" if f.supported else f" – {f.detail}") for f in self.findings]
        return "\n".join([*rows, "", self.verdict()])


# ---------------------------------------------------------------- reading shapes without loading


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a checkpoint file; nested dicts become 'outer.inner' names."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    shapes: dict[str, tuple[int, ...]] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        elif hasattr(value, "shape"):
            shapes[prefix[:-1]] = tuple(value.shape)

    walk("", state)
    return shapes


def folder_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        shapes.update(tensor_shapes(file))
    return shapes


def param_count(shapes: dict[str, tuple[int, ...]], prefix: str = "") -> int:
    total = 0
    for name, shape in shapes.items():
        if name.startswith(prefix):
            count = 1
            for size in shape:
                count *= size
            total += count
    return total


def strip_prefix(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


# ---------------------------------------------------------------- what the shapes say


@dataclass(frozen=True)
class TransformerShape:
    dim: int
    layers: int
    in_dim: int
    ffn_dim: int
    params: int
    block_params: int

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> "TransformerShape | None":
        """Reads either naming (original Wan or diffusers); None when this is no Wan transformer."""
        shapes = {k.removeprefix("model."): v for k, v in shapes.items()}
        patch = shapes.get("patch_embedding.weight")
        if patch is None or len(patch) != 5:
            return None
        blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.") and k.split(".")[1].isdigit()}
        ffn = shapes.get("blocks.0.ffn.0.weight") or shapes.get("blocks.0.ffn.net.0.proj.weight") or (0,)
        return cls(patch[0], len(blocks), patch[1], ffn[0], param_count(shapes), param_count(shapes, "blocks.0."))

    @property
    def name(self) -> str:
        return KNOWN_TRANSFORMERS.get((self.dim, self.layers, self.in_dim),
                                      f"Wan-style transformer (width {self.dim}, {self.layers} blocks, "
                                      f"{self.in_dim} input channels)")


def matching_config(shape: TransformerShape) -> tuple[str, dict] | None:
    """The configs/ file whose generator has this architecture (its path and its raw contents)."""
    from omegaconf import OmegaConf

    from .config import CONFIG_DIR

    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        model = raw.get("model") if isinstance(raw, dict) else None
        if isinstance(model, dict) and (model.get("dim"), model.get("num_layers"), model.get("in_dim")) == (
                shape.dim, shape.layers, shape.in_dim):
            if raw.get("weights", {}).get("layout") != "random":
                return f"configs/{path.name}", raw
    for path in sorted(CONFIG_DIR.glob("*.yaml")):  # the tiny test architecture as a last resort
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        model = raw.get("model") or {}
        if (model.get("dim"), model.get("num_layers"), model.get("in_dim")) == (shape.dim, shape.layers, shape.in_dim):
            return f"configs/{path.name}", raw
    return None


def configs_with_width(width: int) -> list[str]:
    """configs/ files whose generator is `width` wide (what a LoRA or pose encoder must match)."""
    from omegaconf import OmegaConf

    from .config import CONFIG_DIR

    return [f"configs/{p.name}" for p in sorted(CONFIG_DIR.glob("*.yaml"))
            if (OmegaConf.load(p).get("model") or {}).get("dim") == width]


def unsupported_reason(shape: TransformerShape) -> str:
    if shape.in_dim == 48:
        return "Wan2.2's 5B model uses a different VAE (48 latent channels); no causal checkpoint of it exists"
    if shape.in_dim == 36:
        return "image-conditioned 14B model: this app's image-to-video prefills the 1.3B causal cache instead"
    if shape.dim >= 5120:
        return "14B models have no public causal (block-by-block) checkpoint and need about 28 GB for weights alone"
    return "no config in configs/ has this architecture"


def vram_by_profile(shape: TransformerShape, config: PipelineConfig, text_encoder_params: int,
                    vae_params: int) -> dict[str, float]:
    """Estimated peak GPU memory of each profile for the config's default video (bf16): the memory planner's
    own estimate (ModelFootprint, plan_memory) from shapes instead of loaded modules."""
    import torch

    from .memory.planner import ModelFootprint, activation_bytes, plan_memory
    from .memory.profiles import PROFILES
    from .model.kv_cache import kv_bytes_per_frame

    fpb, blocks = config.frames_per_block, config.num_blocks
    latent_h, latent_w = config.latent_size()
    patch = config.model.get("patch_size", (1, 2, 2))
    frame_tokens = (latent_h // patch[1]) * (latent_w // patch[2])
    footprint = ModelFootprint(
        generator_bytes=2 * shape.params, generator_block_bytes=2 * shape.block_params, generator_blocks=shape.layers,
        text_encoder_bytes=2 * text_encoder_params, vae_bytes=2 * vae_params,
        kv_bytes_per_frame=kv_bytes_per_frame(shape.layers, shape.dim, frame_tokens, torch.bfloat16),
        activation_bytes=activation_bytes(frame_tokens, shape.ffn_dim, config.height * config.width, 2))
    window = config.attention_window
    peaks = {}
    for name in PROFILES:  # (the streamed profile's smallest form: no generator block kept resident)
        plan = plan_memory(footprint, 1 << 60, blocks * fpb + 1, fpb, name, window)
        peaks[name] = round((plan.estimated_peak_bytes - plan.resident_blocks * footprint.generator_block_bytes)
                            / GIB, 1)
    return peaks


# ---------------------------------------------------------------- the folder walk


class Inspector:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.findings: list[Finding] = []
        self.claimed: set[Path] = set()  # files already explained by a model folder
        self.bases: list[tuple[Path, int, int]] = []  # usable Wan2.1 bases: folder, text encoder params, VAE params

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.folder)) or "."

    def run(self) -> Report:
        self.bundled_models()
        for index in sorted(self.folder.rglob("model_index.json")):
            self.diffusers_pipeline(index.parent)
        for config in sorted(self.folder.rglob("config.json")):
            if config.parent in self.claimed or any(p in self.claimed for p in config.parents):
                continue
            self.config_folder(config.parent)
        for file in sorted(p for p in self.folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES):
            if not any(p in self.claimed for p in file.parents):
                self.checkpoint_file(file)
        self.dwpose()
        return Report(str(self.folder), self.findings)

    def bundled_models(self) -> None:
        """A model folder that a project config names as its own (`weights.bundled_dir`, e.g. the embedded
        tiny model in assets/tiny_shapes): runnable with that config as it is."""
        from omegaconf import OmegaConf

        from .config import PROJECT_ROOT

        for config in sorted((PROJECT_ROOT / "configs").glob("*.yaml")):
            bundled = OmegaConf.load(config).get("weights", {}).get("bundled_dir")
            root = (PROJECT_ROOT / bundled).resolve() if bundled else None
            if root is None or not root.is_dir() or not (root == self.folder.resolve()
                                                          or self.folder.resolve() in root.parents):
                continue
            self.claimed.add(self.folder / root.relative_to(self.folder.resolve()))
            name = OmegaConf.load(config).get("name", config.stem)
            self.findings.append(Finding(self.rel(self.folder / root.relative_to(self.folder.resolve())),
                                         f"causal generator bundled with this project: {name}", True,
                                         f"the model folder of configs/{config.name}",
                                         config=f"configs/{config.name}"))
            return

    # -- diffusers pipelines and original Wan folders

    def diffusers_pipeline(self, root: Path, index: dict | None = None) -> None:
        """A diffusers folder (model_index.json, or at least transformer/ vae/ text_encoder/ tokenizer/)."""
        self.claimed.add(root)
        if index is None:
            index = json.loads((root / "model_index.json").read_text())
        missing = [f"{self.rel(root / name)}/ (download the whole repo)" for name in
                   ("transformer", "vae", "text_encoder", "tokenizer") if name in index and not (root / name).is_dir()]
        transformer = self.diffusers_transformer(root / "transformer")
        if "transformer_2" in index or "boundary_ratio" in index:
            self.findings.append(Finding(self.rel(root), "Wan2.2 A14B (two experts: transformer and transformer_2, "
                                         f"boundary_ratio {index.get('boundary_ratio')}), diffusers layout", False,
                                         "mixture-of-experts 14B models have no causal checkpoint; this app streams "
                                         "1.3B causal generators", missing))
            return
        if transformer is None:
            self.findings.append(Finding(self.rel(root), f"diffusers pipeline {index.get('_class_name')}", False,
                                         "no Wan transformer in it", missing))
            return
        matched = matching_config(transformer) if transformer.in_dim == 16 else None
        if matched and not missing:
            self.bases.append((root, param_count(folder_shapes(root / "text_encoder")),
                               param_count(folder_shapes(root / "vae"))))
        self.findings.append(Finding(
            self.rel(root), f"{transformer.name}, diffusers layout" + (f" ({index['_class_name']})"
                                                                        if index.get("_class_name") else ""),
            matched is not None,
            "base model: VAE, UMT5 text encoder and tokenizer for a causal generator checkpoint" if matched
            else unsupported_reason(transformer), missing, config=matched[0] if matched else None))

    def diffusers_transformer(self, folder: Path) -> TransformerShape | None:
        config = folder / "config.json"
        if not config.is_file():
            return None
        cfg = json.loads(config.read_text())
        shapes = folder_shapes(folder)
        found = TransformerShape.from_shapes(shapes) if shapes else None
        if found is not None:
            return found
        dim = cfg.get("num_attention_heads", 0) * cfg.get("attention_head_dim", 0)
        return TransformerShape(dim, cfg.get("num_layers", 0), cfg.get("in_channels", 0), cfg.get("ffn_dim", 0), 0, 0)

    def config_folder(self, folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text() or "{}")
        architectures = cfg.get("architectures") or []
        if any(str(a).endswith("ForCausalLM") for a in architectures):
            self.claimed.add(folder)
            has_template = (folder / "chat_template.jinja").is_file() or "chat_template" in (
                (folder / "tokenizer_config.json").read_text() if (folder / "tokenizer_config.json").is_file() else "")
            self.findings.append(Finding(
                self.rel(folder), f"causal language model {architectures[0]}", has_template,
                "prompt extender (--prompt-extender, or name the folder prompt_extender)" if has_template
                else "no chat template: the prompt extender needs an instruction-tuned ('-Instruct') model"))
            return
        if "dim" in cfg and "num_layers" in cfg:  # original Wan layout
            self.original_wan(folder, cfg)
        elif folder.name == "transformer" and not (folder.parent / "model_index.json").is_file():
            self.diffusers_pipeline(folder.parent, {name: [] for name in ("transformer", "vae", "text_encoder",
                                                                           "tokenizer")})

    def original_wan(self, folder: Path, cfg: dict) -> None:
        self.claimed.add(folder)
        shapes = {}
        for file in sorted(folder.glob("diffusion_pytorch_model*.safetensors")):
            shapes.update(tensor_shapes(file))
        transformer = TransformerShape.from_shapes(shapes) or TransformerShape(
            cfg["dim"], cfg["num_layers"], cfg.get("in_dim", 16), cfg.get("ffn_dim", 0), 0, 0)
        vae = next((folder / n for n in ("Wan2.1_VAE.pth", "Wan2.2_VAE.pth") if (folder / n).is_file()), None)
        missing = []
        if vae is None:
            missing.append(f"{self.rel(folder)}/Wan2.1_VAE.pth (from {WAN_REPO})")
        if not (folder / T5_FILE).is_file():
            missing.append(f"{self.rel(folder)}/{T5_FILE} (from {WAN_REPO})")
        if not (folder / "google" / "umt5-xxl").is_dir():
            missing.append(f"{self.rel(folder)}/google/umt5-xxl/ tokenizer (from {WAN_REPO})")
        matched = matching_config(transformer) if transformer.in_dim == 16 and vae and "2.2" not in vae.name else None
        if matched and not missing:
            self.bases.append((folder, param_count(tensor_shapes(folder / T5_FILE)), param_count(tensor_shapes(vae))))
        self.findings.append(Finding(
            self.rel(folder), f"{transformer.name}, original Wan layout ({cfg.get('model_type', '?')})",
            matched is not None,
            "base model: VAE, UMT5 text encoder and tokenizer for a causal generator checkpoint" if matched
            else unsupported_reason(transformer), missing, config=matched[0] if matched else None))

    # -- single files

    def checkpoint_file(self, file: Path) -> None:
        try:
            shapes = tensor_shapes(file)
        except Exception as err:  # a truncated or foreign file: say so and go on
            self.findings.append(Finding(self.rel(file), "unreadable file", False, f"{type(err).__name__}: "
                                         f"{str(err).splitlines()[0][:160]} (re-download it)"))
            return
        tops = {name.split(".")[0] for name in shapes}
        if tops & {"generator", "generator_ema"}:
            self.causal_generator(file, shapes, tops)
        elif any(k in name for name in shapes for k in ("lora_A", "lora_B", "lora_down", "lora_up")):
            self.lora(file, shapes)
        elif any(name.startswith(("dwpose_embedding.", "randomref_embedding_pose.")) for name in shapes):
            self.pose_encoders(file, shapes)
        elif file.name.startswith("taew") or (tops <= {"encoder", "decoder"} and param_count(shapes) < 20_000_000):
            self.tiny_autoencoder(file, shapes)
        elif TransformerShape.from_shapes(shapes) is not None:
            shape = TransformerShape.from_shapes(shapes)
            matched = matching_config(shape)
            self.findings.append(Finding(self.rel(file), f"{shape.name} transformer weights (bidirectional)",
                                         False, "a bidirectional Wan DiT cannot stream block by block: use a causal "
                                         f"generator such as self_forcing_dmd.pt ({SELF_FORCING_REPO})"
                                         if matched else unsupported_reason(shape)))

    def causal_generator(self, file: Path, shapes: dict, tops: set[str]) -> None:
        key = "generator_ema" if "generator_ema" in tops else "generator"
        shape = TransformerShape.from_shapes(strip_prefix(shapes, key + "."))
        sets = " and ".join(f"'{t}'" for t in sorted(tops & {"generator", "generator_ema"}))
        if shape is None:
            self.findings.append(Finding(self.rel(file), "causal generator checkpoint", False,
                                         f"{sets} hold no Wan transformer"))
            return
        matched = matching_config(shape)
        if matched is None or shape.in_dim != 16:
            self.findings.append(Finding(self.rel(file), f"causal generator ({shape.name})", False,
                                         unsupported_reason(shape)))
            return
        config_name, config = matched
        missing, vram = [], None
        if not self.bases:
            missing.append(f"the Wan2.1 base (VAE, UMT5, tokenizer): download {WAN_REPO} into wan_models/Wan2.1-T2V-1.3B/")
        else:
            _, text_params, vae_params = self.bases[0]
            vram = vram_by_profile(shape, load_config(PROJECT_ROOT / config_name), text_params, vae_params)
        expected = (config.get("weights") or {}).get("generator_ckpt")
        detail = f"{sets} weights ({shape.params / 1e6:,.1f} M parameters); loads with {config_name}"
        if expected and self.rel(file) != expected:
            detail += f" (the config expects it at {expected})"
        self.findings.append(Finding(self.rel(file), f"causal generator ({shape.name})", True, detail, missing, vram,
                                     config_name))

    def lora(self, file: Path, shapes: dict) -> None:
        from .loading.lora import provenance

        down = {n: s for n, s in shapes.items() if "lora_A" in n or "lora_down" in n}
        style = ("original Wan / ComfyUI / musubi-tuner names" if any(n.startswith(("diffusion_model.", "lora_unet"))
                                                                        for n in shapes)
                 else "diffusers / peft names")
        widths = {s[1] for n, s in down.items() if len(s) == 2 and any(k in n for k in ("self_attn.q", "attn1.to_q"))}
        width = max(widths) if widths else max((s[1] for s in down.values() if len(s) == 2), default=0)
        rank = min((s[0] for s in down.values() if len(s) == 2), default=0)
        base = {1536: "Wan2.1 1.3B", 5120: "Wan 14B", 3072: "Wan2.2 5B"}.get(width, f"width {width}")
        configs = configs_with_width(width)
        trained = provenance(file)
        self.findings.append(Finding(
            self.rel(file), f"LoRA for {base} (rank {rank}, {style})", bool(configs),
            (f"fits the generator of {', '.join(configs)}" if configs else
             "made for another base model: its shapes fit no generator in configs/ (the app runs width 1536)")
            + (f"; trained {trained}" if trained else "")))

    def tiny_autoencoder(self, file: Path, shapes: dict) -> None:
        from .loading.tiny_decoder import layout_problem, not_a_decoder

        problem = layout_problem(shapes)
        if problem:
            self.findings.append(Finding(self.rel(file), "tiny video autoencoder (TAEHV-style)", False,
                                         not_a_decoder(file, problem)))
            return
        self.findings.append(Finding(self.rel(file), "TAEHV decoder for Wan 2.1 latents (taew2_1)", True,
                                     "fast preview decoding: python -m pipelines.cli --fast-decoder"))

    def pose_encoders(self, file: Path, shapes: dict) -> None:
        out = [s[0] for n, s in shapes.items() if n.startswith("dwpose_embedding.") and n.endswith("weight")]
        width = out[-1] if out else 0
        configs = configs_with_width(width)
        self.findings.append(Finding(
            self.rel(file), f"pose encoders (UniAnimate-style, width {width})", bool(configs),
            f"fit the generator of {', '.join(configs)} (pose tab)" if configs else
            "width differs from the 1.3B generator's 1536 (UniAnimate's public encoders are 5120 wide, for 14B)"))

    def dwpose(self) -> None:
        found = {name: sorted(self.folder.rglob(name)) for name in DWPOSE_FILES}
        if not any(found.values()):
            return
        folder = next(p[0].parent for p in found.values() if p)
        missing = [f"{self.rel(folder)}/{name} (from {DWPOSE_REPO})" for name, paths in found.items() if not paths]
        note = "" if folder.name == "dwpose" and folder.parent == self.folder else \
            " (the app looks in <weights>/dwpose/: move them there)"
        self.findings.append(Finding(self.rel(folder), "DWPose ONNX pose extractor", True,
                                     "used by the pose tab for driving videos" + note, missing))


def inspect_folder(folder: str | Path) -> Report:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    return Inspector(folder).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.weights_inspector",
                                     description="What a weights folder holds and whether this app can run it.")
    parser.add_argument("folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        report = inspect_folder(args.folder)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"folder": report.folder, "verdict": report.verdict(),
                          "findings": [asdict(f) for f in report.findings]}, indent=2))
    else:
        print(report.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
