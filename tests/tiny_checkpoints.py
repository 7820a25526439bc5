"""Writes the tiny random model to disk in the real checkpoints' layouts.

Original Wan / Self-Forcing key names are produced by inverting diffusers' converters; the
tests check that diffusers' converters map them back exactly, so the files have the real
original names.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch
import yaml
from safetensors.torch import save_file

from pipelines.config import CONFIG_DIR
from pipelines.loading.weights import Components

_DIT_TO_ORIGINAL = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    ("attn1", "self_attn"), ("attn2", "cross_attn"),
    (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
    (".norm2.", ".norm3."),
)


def dit_key_to_original(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    if key.startswith("proj_out."):
        return key.replace("proj_out.", "head.head.")
    for new, old in _DIT_TO_ORIGINAL:
        key = key.replace(new, old)
    return key.replace("scale_shift_table", "modulation")


_RES = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
        "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
        "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}


def vae_key_to_original(key: str) -> str:
    fixed = {"quant_conv.weight": "conv1.weight", "quant_conv.bias": "conv1.bias",
             "post_quant_conv.weight": "conv2.weight", "post_quant_conv.bias": "conv2.bias"}
    if key in fixed:
        return fixed[key]
    side, rest = key.split(".", 1)
    rest = rest.replace("conv_in.", "conv1.").replace("norm_out.", "head.0.").replace("conv_out.", "head.2.")
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", rest)
    if m:
        index = 1 if m[1] == "attentions" else 2 * int(m[2])
        tail = m[3] if m[1] == "attentions" else _RES[m[3]]
        return f"{side}.middle.{index}.{tail}"
    m = re.match(r"down_blocks\.(\d+)\.(.+)", rest)
    if m:
        return f"{side}.downsamples.{m[1]}.{_RES.get(m[2], m[2])}"
    m = re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)
    if m:
        return f"{side}.upsamples.{4 * int(m[1]) + int(m[2])}.{_RES[m[3]]}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest)
    if m:
        return f"{side}.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    return f"{side}.{rest}"


_T5_TO_WAN = (
    ("layer.0.SelfAttention.relative_attention_bias.", "pos_embedding.embedding."),
    ("layer.0.SelfAttention.", "attn."), ("layer.0.layer_norm.", "norm1."), ("layer.1.layer_norm.", "norm2."),
    ("layer.1.DenseReluDense.wi_0.", "ffn.gate.0."), ("layer.1.DenseReluDense.wi_1.", "ffn.fc1."),
    ("layer.1.DenseReluDense.wo.", "ffn.fc2."),
)


def t5_key_to_wan(key: str) -> str | None:
    if key == "shared.weight":
        return "token_embedding.weight"
    if key == "encoder.embed_tokens.weight":
        return None
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    key = key.replace("encoder.block.", "blocks.")
    for new, old in _T5_TO_WAN:
        key = key.replace(new, old)
    return key


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def write_self_forcing_checkpoint(components: Components, path: Path, ema_offset: float = 0.0) -> None:
    """checkpoints/self_forcing_dmd.pt: generator and generator_ema, keys prefixed 'model.'."""
    original = {"model." + dit_key_to_original(k): v for k, v in _cpu(components.generator.state_dict()).items()}
    ema = {k: v + ema_offset for k, v in original.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": original, "generator_ema": ema}, path)


def write_original_layout(components: Components, root: Path) -> Path:
    base = root / "wan_models" / "Wan2.1-T2V-1.3B"
    base.mkdir(parents=True, exist_ok=True)
    cfg = components.generator.config
    (base / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "dim": cfg.dim, "eps": cfg.eps, "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim,
        "in_dim": cfg.in_dim, "model_type": "t2v", "num_heads": cfg.num_heads, "num_layers": cfg.num_layers,
        "out_dim": cfg.out_dim, "text_len": cfg.text_len}))
    dit = {dit_key_to_original(k): v for k, v in _cpu(components.generator.state_dict()).items()}
    save_file(dit, str(base / "diffusion_pytorch_model.safetensors"))
    vae = {vae_key_to_original(k): v for k, v in _cpu(components.vae.model.state_dict()).items()}
    torch.save(vae, base / "Wan2.1_VAE.pth")
    t5 = {}
    for k, v in _cpu(components.prompt_encoder.model.state_dict()).items():
        name = t5_key_to_wan(k)
        if name:
            t5[name] = v
    torch.save(t5, base / "models_t5_umt5-xxl-enc-bf16.pth")
    components.prompt_encoder.tokenizer.save_pretrained(base / "google" / "umt5-xxl")
    write_self_forcing_checkpoint(components, root / "checkpoints" / "self_forcing_dmd.pt")
    return root


def write_diffusers_layout(components: Components, root: Path, folder: str = "Wan2.1-T2V-1.3B-Diffusers") -> Path:
    base = root / folder
    (base / "transformer").mkdir(parents=True, exist_ok=True)
    (base / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": "0.33.0.dev0", "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}))
    cfg = components.generator.config
    (base / "transformer" / "config.json").write_text(json.dumps({
        "_class_name": "WanTransformer3DModel", "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.dim // cfg.num_heads, "in_channels": cfg.in_dim, "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm, "qk_norm": "rms_norm_across_heads", "eps": cfg.eps}))
    state = _cpu(components.generator.state_dict())
    keys = sorted(state)
    half = len(keys) // 2  # sharded like the real repo
    save_file({k: state[k] for k in keys[:half]}, str(base / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in keys[half:]}, str(base / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors"))
    components.vae.model.save_pretrained(base / "vae")
    components.prompt_encoder.model.save_pretrained(base / "text_encoder")
    components.prompt_encoder.tokenizer.save_pretrained(base / "tokenizer")
    write_self_forcing_checkpoint(components, root / "checkpoints" / "self_forcing_dmd.pt")
    return root


CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_tiny_causal_lm(folder: Path, seed: int = 0) -> Path:
    """A tiny random instruct LM in the exact folder layout of a Hugging Face download:
    config.json, generation_config.json, model.safetensors, tokenizer files with a chat template."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pipelines.loading.weights import byte_tokenizer

    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def registered_on_tiny(components: Components, folder: Path, key: str,
                       checkpoint: Callable[[dict[str, torch.Tensor]], object]):
    """The registry's entry `key` on the tiny architecture, loaded through the registry from files written in its
    project's layout: the Wan base, and checkpoint(state) saved at the entry's generator_ckpt, where state holds the
    tiny generator's weights under original Wan names prefixed 'model.' (as the projects' wrappers name them)."""
    from pipelines.core import StreamingVideoPipeline
    from pipelines.loading.weights import load_components
    from pipelines.registry import load_registry

    weights = folder / "weights"
    write_original_layout(components, weights)
    model = load_registry()[key]
    path = weights / model.config.weights.generator_ckpt
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model." + dit_key_to_original(k): v.detach().clone() for k, v in components.generator.state_dict().items()}
    torch.save(checkpoint(state), path)
    tiny = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    config = folder / f"{key}.yaml"
    config.write_text(yaml.safe_dump({"base": str(model.config_path), "model": tiny["model"], "vae": tiny["vae"],
                                      "text_encoder": tiny["text_encoder"], "dtype": "float32", "height": 64,
                                      "width": 96, "resolutions": ["96x64"]}))
    (folder / "models.yaml").write_text(yaml.safe_dump({"models": {key: {"config": config.name}}}))
    entry = load_registry(folder / "models.yaml")[key]
    assert not entry.missing(weights)
    return StreamingVideoPipeline(load_components(entry.config, weights), entry.config)
