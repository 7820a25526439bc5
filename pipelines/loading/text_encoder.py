"""UMT5 prompt encoder (transformers UMT5EncoderModel) as Wan uses it.

Prompts are cleaned like Wan's tokenizer wrapper (HTML unescape, ftfy, whitespace), padded
to text_len tokens, encoded, and every position past the prompt's length is zeroed. The
original Wan checkpoint (models_t5_umt5-xxl-enc-bf16.pth) is converted to transformers'
key names here; its architecture is read off the tensor shapes.
"""
from __future__ import annotations

import html
import logging
import re
from collections import OrderedDict

import torch
from transformers import PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

log = logging.getLogger(__name__)

_WAN_T5_RENAMES = (
    ("attn.q.", "layer.0.SelfAttention.q."), ("attn.k.", "layer.0.SelfAttention.k."),
    ("attn.v.", "layer.0.SelfAttention.v."), ("attn.o.", "layer.0.SelfAttention.o."),
    ("pos_embedding.embedding.", "layer.0.SelfAttention.relative_attention_bias."),
    ("norm1.", "layer.0.layer_norm."), ("norm2.", "layer.1.layer_norm."),
    ("ffn.gate.0.", "layer.1.DenseReluDense.wi_0."), ("ffn.fc1.", "layer.1.DenseReluDense.wi_1."),
    ("ffn.fc2.", "layer.1.DenseReluDense.wo."),
)


def umt5_config_from_wan_state(state: dict[str, torch.Tensor]) -> UMT5Config:
    """Reads vocab, widths, depth and heads of a Wan T5 encoder state dict off its shapes."""
    vocab, d_model = state["token_embedding.weight"].shape
    num_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    inner = state["blocks.0.attn.q.weight"].shape[0]
    d_ff = state["blocks.0.ffn.fc1.weight"].shape[0]
    return umt5_config(vocab, d_model, inner // heads, d_ff, num_layers, heads, buckets)


def umt5_config(vocab: int, d_model: int, d_kv: int, d_ff: int, num_layers: int, num_heads: int,
                buckets: int = 32) -> UMT5Config:
    return UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
                      num_heads=num_heads, relative_attention_num_buckets=buckets,
                      relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                      dense_act_fn="gelu_new", is_encoder_decoder=False, tie_word_embeddings=False)


def wan_t5_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a Wan T5 encoder state dict to UMT5EncoderModel's names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            for old, new in _WAN_T5_RENAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[f"encoder.block.{index}.{rest}"] = value
        else:
            out[key] = value
    return out


def clean_prompt(text: str) -> str:
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs mojibake; plain prompts are unaffected without it
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class PromptEncoder:
    """Tokenizer + UMT5 encoder with a small per-instance memo of recent prompts."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: UMT5EncoderModel, text_len: int,
                 memo_size: int = 8) -> None:
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.text_len = text_len
        self.memo_size = memo_size
        self._memo: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def device(self) -> torch.device:
        """Where the encoder layers run (the token embedding may stay on the CPU when streaming)."""
        return self.model.encoder.final_layer_norm.weight.device

    def token_count(self, prompt: str) -> int:
        """Tokens of the cleaned prompt including the end token; only text_len of them are encoded."""
        return len(self.tokenizer(clean_prompt(prompt), add_special_tokens=True).input_ids)

    def tokenize(self, prompts: list[str], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, attention mask), each [len(prompts), text_len], of prompts already cleaned."""
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True,
                                max_length=self.text_len, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        return tokens.input_ids.to(device), tokens.attention_mask.to(device)

    @torch.no_grad()
    def encode(self, prompt: str, device: torch.device | str | None = None) -> torch.Tensor:
        """[1, text_len, d_model] embeddings with padding positions zeroed (kept on the CPU memo)."""
        key = clean_prompt(prompt)
        if key not in self._memo:
            embedding = self.model.shared
            ids, mask = self.tokenize([key], embedding.weight.device)
            embeds = embedding(ids).to(self.device)
            mask = mask.to(self.device)
            hidden = self.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            hidden = hidden * mask[..., None].to(hidden.dtype)
            self._memo[key] = hidden.cpu()
            while len(self._memo) > self.memo_size:
                self._memo.popitem(last=False)
        self._memo.move_to_end(key)
        return self._memo[key].to(device or self.device)
