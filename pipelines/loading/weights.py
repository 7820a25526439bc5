"""Loads the generator, VAE and text encoder from local folders (never from a hub).

Two on-disk layouts are understood, under one weights folder:
  original:  wan_models/Wan2.1-T2V-1.3B/{config.json, diffusion_pytorch_model.safetensors,
             Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/}
  diffusers: Wan2.1-T2V-1.3B-Diffusers/{transformer/, vae/, text_encoder/, tokenizer/}
plus the Self-Forcing generator checkpoints/self_forcing_dmd.pt ('generator' and
'generator_ema', keys optionally prefixed 'model.'). Original key names are converted with
diffusers' own single-file converters. Anything missing or mismatched raises WeightsError
with one message naming the file and what to download.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5EncoderModel

from ..config import PipelineConfig, display_path
from ..model.transformer import CausalWanModel
from .lora import LoraError, merge_permanently
from .sources import (
    SELF_FORCING_REPO,
    T5_FILE,
    VAE_FILE,
    WAN_BASE_DOWNLOAD,
    WAN_DIFFUSERS_REPO,
    WAN_REPO,
    WeightsError,
    hf_download,
)
from .text_encoder import PromptEncoder, umt5_config, umt5_config_from_wan_state, wan_t5_to_transformers
from .vae import WanVAE

log = logging.getLogger(__name__)


class _EmptyFloat32ListFilter(logging.Filter):
    """diffusers warns on every `.to(dtype)` that modules "should be kept in float32" even when the list is empty
    (ModelMixin.to tests the list for None after replacing None with []): that warning says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_EmptyFloat32ListFilter())


@dataclass
class Components:
    generator: CausalWanModel
    vae: WanVAE
    prompt_encoder: PromptEncoder
    description: str
    model_dir: Path | None = None  # the folder the model's files came from (its pose encoders live there too)


def _require(path: Path, what: str, hint: str = "") -> Path:
    if not path.exists():
        raise WeightsError(f"Missing {what}: {path} does not exist. {hint or _download_hint(path)}")
    return path


def _download_hint(path: Path) -> str:
    name = str(path)
    if "self_forcing" in name or "checkpoints" in name:
        return f"Download it: {hf_download(SELF_FORCING_REPO, 'checkpoints/self_forcing_dmd.pt')}"
    if "Diffusers" in name:
        return f"Download it: {hf_download(WAN_DIFFUSERS_REPO, into='<weights>/Wan2.1-T2V-1.3B-Diffusers')}"
    return f"Download it: {WAN_BASE_DOWNLOAD}"


def read_state(path: Path) -> dict:
    """A .safetensors or torch checkpoint file; an unreadable one is named in a WeightsError."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise WeightsError(f"Could not read {path}: {exc}. Re-download it.") from exc


def _load_safetensors_dir(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"Missing weights: no *.safetensors in {folder}. {_download_hint(folder)}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_state(file))
    return state


def _load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Strict load with a readable report of missing, unexpected and mis-shaped tensors."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or mismatched:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if mismatched:
            details.append(f"{len(mismatched)} with the wrong shape (e.g. {'; '.join(mismatched[:3])})")
        raise WeightsError(f"{source} does not match the configured model: {'; '.join(details)}. "
                           f"Check that the config and the downloaded files are for the same model. "
                           f"{_download_hint(source)}")
    if unexpected:
        log.warning("%s: ignoring %d unexpected tensors (e.g. %s)", source, len(unexpected), unexpected[:3])
    module.load_state_dict({k: state[k] for k in expected}, strict=True)


def generator_state_from_checkpoint(path: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    """Self-Forcing .pt -> diffusers-named generator weights; a .safetensors file (what
    `training.train --full` writes) already holds diffusers names and one set of weights."""
    if path.suffix == ".safetensors":
        return read_state(path)
    checkpoint = read_state(path)
    if not {"generator", "generator_ema"} & set(checkpoint) and all(str(k).startswith("model.") for k in checkpoint):
        checkpoint = {"generator": checkpoint}  # one set of weights saved as the wrapper's state dict (Reward Forcing)
        use_ema = False
    key = "generator_ema" if use_ema else "generator"
    if key not in checkpoint:
        raise WeightsError(f"{path} has no '{key}' weights (it has: {', '.join(map(str, checkpoint))}). "
                           f"{'Run with --no-ema (or weights.use_ema: false)' if use_ema else 'Run with --use-ema'}.")
    # (Causal Forcing's checkpoints may keep FSDP's wrapper in the names: model._fsdp_wrapped_module.blocks...)
    state = {k.removeprefix("model._fsdp_wrapped_module.").removeprefix("model."): v for k, v in checkpoint[key].items()}
    return convert_wan_transformer_to_diffusers(state)


def detected_layout(config: PipelineConfig, folder: Path | None) -> str | None:
    """'original' or 'diffusers' when `folder` holds the model in that layout, else None."""
    if folder is None:
        return None
    if (folder / config.weights.original_dir).is_dir():
        return "original"
    if (folder / config.weights.diffusers_dir).is_dir() or (folder / "transformer").is_dir():
        return "diffusers"
    return None


def model_files_dir(config: PipelineConfig, weights_dir: Path | None) -> Path | None:
    """Where the model's own files are read from: the weights folder, or the config's bundled folder
    when the weights folder (if any) does not hold the model."""
    if config.weights.bundled_dir and not detected_layout(config, weights_dir):
        from ..config import PROJECT_ROOT

        bundled = PROJECT_ROOT / config.weights.bundled_dir
        if not detected_layout(config, bundled):
            raise WeightsError(f"Missing {config.name}: {bundled} does not exist. {config.download}")
        return bundled
    return weights_dir


def resolve_layout(config: PipelineConfig, weights_dir: Path | None) -> str:
    layout = config.weights.layout
    if layout != "auto":
        return layout
    if weights_dir is None:
        raise WeightsError(f"{config.name} needs downloaded weights: pass --weights DIR "
                           f"(or set SF_WEIGHTS_DIR). See README 'Real weights'.")
    detected = detected_layout(config, weights_dir)
    if detected:
        return detected
    raise WeightsError(
        f"No Wan2.1 weights under {weights_dir}: expected {weights_dir / config.weights.original_dir} "
        f"(download {WAN_REPO}) or {weights_dir / config.weights.diffusers_dir} (download {WAN_DIFFUSERS_REPO}).")


def _diffusers_root(config: PipelineConfig, weights_dir: Path) -> Path:
    nested = weights_dir / config.weights.diffusers_dir
    return nested if nested.is_dir() else weights_dir


def load_components(config: PipelineConfig, weights_dir: str | Path | None = None,
                    device: torch.device | str = "cpu") -> Components:
    """Builds generator, VAE and prompt encoder for config from weights_dir, on device."""
    weights_dir = model_files_dir(config, Path(weights_dir).expanduser() if weights_dir else None)
    layout = resolve_layout(config, weights_dir)
    dtype = config.torch_dtype
    generator = CausalWanModel(**config.model)
    text_len = config.text_encoder.get("text_len", config.model.get("text_len", 512))

    if layout == "random":
        components = _random_components(config, generator, text_len)
    elif layout == "original":
        components = _original_components(config, weights_dir, generator, text_len)
    elif layout == "diffusers":
        components = _diffusers_components(config, weights_dir, generator, text_len)
    else:
        raise WeightsError(f"Unknown weights layout {layout!r} in {config.source}: use auto, original, "
                           f"diffusers or random.")

    if config.weights.generator_ckpt and layout != "random":
        ckpt = _require(weights_dir / config.weights.generator_ckpt, f"{config.name} generator checkpoint",
                        config.download)
        _load_into(generator, generator_state_from_checkpoint(ckpt, config.weights.use_ema), ckpt)
        weights = "EMA weights ('generator_ema')" if config.weights.use_ema else "non-EMA weights ('generator')"
        components.description += f" + {ckpt.name}, {weights}"
    if config.weights.generator_lora and layout != "random":
        lora = _require(weights_dir / config.weights.generator_lora, f"{config.name} LoRA", config.download)
        try:
            layers = merge_permanently(generator, lora, config.weights.generator_lora_scale)
        except LoraError as err:
            raise WeightsError(f"{err} {config.download}") from err
        components.description += f" + {lora.name} ({layers} layers merged)"

    components.model_dir = weights_dir
    components.generator.to(device=device, dtype=dtype).eval().requires_grad_(False)
    components.vae.model.to(device=device, dtype=dtype)
    components.prompt_encoder.model.to(device=device, dtype=dtype)
    return components


def _original_components(config: PipelineConfig, weights_dir: Path, generator: CausalWanModel,
                         text_len: int) -> Components:
    base = weights_dir / config.weights.original_dir
    if not config.weights.generator_ckpt:
        source = _require(base / "diffusion_pytorch_model.safetensors", "Wan2.1 DiT weights")
        _load_into(generator, convert_wan_transformer_to_diffusers(read_state(source)), source)

    vae_path = _require(base / VAE_FILE, "Wan2.1 VAE")
    vae_model = AutoencoderKLWan(**config.vae)
    _load_into(vae_model, convert_wan_vae_to_diffusers(read_state(vae_path)), vae_path)

    t5_path = _require(base / T5_FILE, "UMT5-XXL text encoder")
    t5_state = read_state(t5_path)
    try:
        t5_config = umt5_config_from_wan_state(t5_state)
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"{t5_path} is not a Wan UMT5 encoder checkpoint (no {exc}). "
                           f"{_download_hint(t5_path)}") from exc
    t5 = UMT5EncoderModel(t5_config)
    _load_into(t5, wan_t5_to_transformers(t5_state), t5_path)
    tokenizer = _load_tokenizer(_require(base / "google" / "umt5-xxl", "UMT5 tokenizer folder"))
    return Components(generator, WanVAE(vae_model), PromptEncoder(tokenizer, t5, text_len),
                      f"{config.name} from {display_path(base)} (original layout)")


def _diffusers_components(config: PipelineConfig, weights_dir: Path, generator: CausalWanModel,
                          text_len: int) -> Components:
    root = _diffusers_root(config, weights_dir)
    if not config.weights.generator_ckpt:
        folder = _require(root / "transformer", "diffusers transformer folder")
        _load_into(generator, _load_safetensors_dir(folder), folder)
    vae_dir = _require(root / "vae", "diffusers VAE folder")
    text_dir = _require(root / "text_encoder", "diffusers text encoder folder")
    try:
        vae_model = AutoencoderKLWan.from_pretrained(vae_dir, local_files_only=True)
        t5 = UMT5EncoderModel.from_pretrained(text_dir, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"Could not load {vae_dir} / {text_dir}: {exc}. {_download_hint(root)}") from exc
    tokenizer = _load_tokenizer(_require(root / "tokenizer", "diffusers tokenizer folder"))
    return Components(generator, WanVAE(vae_model), PromptEncoder(tokenizer, t5, text_len),
                      f"{config.name} from {display_path(root)} (diffusers layout)")


def _load_tokenizer(folder: Path):
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"Could not load the tokenizer in {folder}: {exc}. {_download_hint(folder)}") from exc


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A self-contained byte-level tokenizer (256 bytes + pad/eos) for the random tiny model."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "</s>": 1, **{char: i + 2 for i, char in enumerate(alphabet)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        pre_tokenizers.Split(Regex("."), "isolated")])
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="</s>")


def _random_components(config: PipelineConfig, generator: CausalWanModel, text_len: int) -> Components:
    """Seeded random weights: the embedded default and the tests' model."""
    rng = torch.Generator().manual_seed(config.weights.random_seed)
    tc = config.text_encoder
    t5 = UMT5EncoderModel(umt5_config(258, tc["d_model"], tc["d_kv"], tc["d_ff"], tc["num_layers"], tc["num_heads"]))
    vae_model = AutoencoderKLWan(**config.vae)
    for module in (generator, vae_model, t5):
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.copy_(_random_like(name, param, rng))
    return Components(generator, WanVAE(vae_model), PromptEncoder(byte_tokenizer(), t5, text_len),
                      config.name)


def _random_like(name: str, param: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Fan-in scaled normals; norm gains near 1 and small biases, so activations stay O(1)."""
    noise = torch.randn(param.shape, generator=rng)
    if name.endswith("gamma") or (param.ndim == 1 and name.endswith("weight")):
        return 1.0 + 0.1 * noise
    if param.ndim <= 1:
        return 0.1 * noise
    return noise / param[0].numel() ** 0.5
