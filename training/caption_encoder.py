"""Trains the tiny UMT5 prompt encoder to read the synthetic world's captions.

The encoder reads words, not bytes (world_tokenizer): with bytes, a three-layer encoder must first
assemble "dark blue" from nine characters and tell it from "blue", and after 1000 steps it still
named the background of only ~60 % of captions; with the world's ~90 words it learns the captions
in a few hundred steps. Every output token of a caption is trained (through small linear heads that are thrown away
afterwards) to predict all of the scene's parameters: each shape's colour, kind and motion, the
figure's colour and action, and the background colours. A token then carries the whole caption's
meaning, whatever the wording, so the generator's cross-attention can read it from any position.
The encoder is frozen while the generator trains (its prompt embeddings are cached with the clips).
"""
from __future__ import annotations

import logging
import random
import time

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import nn
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, UMT5EncoderModel

from pipelines.loading.text_encoder import PromptEncoder, clean_prompt

from .synthetic import (
    ALL_BACKGROUND_COLOURS,
    FIGURE_ACTIONS,
    MOTION_PHRASES,
    MOTIONS,
    SHAPE_COLOURS,
    SHAPES,
    Scene,
    SyntheticWorld,
)
from .train import learning_rate_factor

log = logging.getLogger(__name__)
MAX_SHAPES = 3
# (name, classes): class 0 is "absent" wherever something may be missing
TARGETS = ([(f"shape{k}_{part}", n + 1) for k in range(MAX_SHAPES)
            for part, n in (("colour", len(SHAPE_COLOURS)), ("kind", len(SHAPES)), ("motion", len(MOTIONS)))]
           + [("figure_colour", len(SHAPE_COLOURS) + 1), ("figure_action", len(FIGURE_ACTIONS) + 1),
              ("background0", len(ALL_BACKGROUND_COLOURS) + 1), ("background1", len(ALL_BACKGROUND_COLOURS) + 1)])


SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
CAPTION_WORDS = ("a", "an", "and", "on", "background", "stick", "figure")  # the caption templates' own words


def world_vocabulary() -> list[str]:
    """Every word and punctuation mark the world's captions use, sorted."""
    split = pre_tokenizers.Whitespace()
    phrases = [*SHAPE_COLOURS, *ALL_BACKGROUND_COLOURS, *SHAPES, *CAPTION_WORDS, ",",
               *(p for group in (*MOTION_PHRASES.values(), *FIGURE_ACTIONS.values()) for p in group)]
    return sorted({word for phrase in phrases for word, _ in split.pre_tokenize_str(phrase.lower())})


def world_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over world_vocabulary(): lower-cased, any other word becomes <unk>."""
    return word_tokenizer(world_vocabulary())


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (after the special tokens): lower-cased, any other word <unk>."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def grown_to_world(tokenizer: PreTrainedTokenizerBase, model: UMT5EncoderModel) -> PreTrainedTokenizerFast:
    """The world's tokenizer, and `model`'s token embeddings remapped to it in place: a word the encoder
    already reads keeps its row (ids move, as the vocabulary is sorted), a new word gets a fresh row as T5
    initialises them. So a trained encoder continues on a world that gained words."""
    grown = world_tokenizer()
    old_rows, old_vocab = model.get_input_embeddings().weight.data, tokenizer.get_vocab()
    rows = torch.randn(len(grown), old_rows.shape[1], dtype=old_rows.dtype) * model.config.initializer_factor
    kept = 0
    for token, index in grown.get_vocab().items():
        if token in old_vocab:
            rows[index], kept = old_rows[old_vocab[token]], kept + 1
    model.set_input_embeddings(nn.Embedding.from_pretrained(rows, freeze=False))
    model.config.vocab_size = len(grown)
    log.info("caption vocabulary: %d words kept, %d new", kept - len(SPECIAL_TOKENS), len(grown) - kept)
    return grown


def scene_targets(scene: Scene) -> list[int]:
    """Class indices for TARGETS, in order."""
    colours, kinds, motions = list(SHAPE_COLOURS), list(SHAPES), list(MOTIONS)
    targets = []
    for k in range(MAX_SHAPES):
        spec = scene.shapes[k] if k < len(scene.shapes) else None
        targets += [0, 0, 0] if spec is None else [colours.index(spec.colour) + 1, kinds.index(spec.shape) + 1,
                                                    motions.index(spec.motion) + 1]
    figure = scene.figure
    targets += [0, 0] if figure is None else [colours.index(figure.colour) + 1,
                                              list(FIGURE_ACTIONS).index(figure.action) + 1]
    backgrounds = list(ALL_BACKGROUND_COLOURS)
    names = scene.background.colours if scene.background.describe() in scene.caption else ()  # a caption may name none
    targets += [backgrounds.index(names[k]) + 1 if k < len(names) else 0 for k in (0, 1)]
    return targets


class CaptionHeads(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(width, classes) for _, classes in TARGETS)

    def loss(self, hidden: torch.Tensor, valid: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Cross-entropy of every valid token against the caption's targets; (loss, token accuracy)."""
        tokens = hidden[valid]  # [N, width]
        per_token = targets[:, None, :].expand(-1, hidden.shape[1], -1)[valid]  # [N, heads]
        losses, correct = [], []
        for index, head in enumerate(self.heads):
            logits = head(tokens)
            losses.append(nn.functional.cross_entropy(logits, per_token[:, index]))
            correct.append((logits.argmax(-1) == per_token[:, index]).float().mean())
        return torch.stack(losses).mean(), float(torch.stack(correct).mean())


def train_caption_encoder(encoder: PromptEncoder, world: SyntheticWorld, steps: int, batch_size: int,
                          learning_rate: float, device: torch.device, log_every: int = 200,
                          heads_first: int = 0) -> float:
    """Trains encoder.model in place on captions of fresh training scenes; returns the final token accuracy.
    heads_first: steps that train only the (new, random) heads before the encoder joins in, so that a trained
    encoder continuing on a grown world is not pushed around by heads that know nothing yet."""
    model: UMT5EncoderModel = encoder.model.to(device).train()
    heads = CaptionHeads(model.config.d_model).to(device)
    optimizer = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, max(1, steps // 20), steps, "cosine"))
    rng = random.Random(world.seed)
    started, accuracy = time.perf_counter(), 0.0
    for step in range(steps):
        model.requires_grad_(step >= heads_first)
        scenes = [world.scene(rng.randrange(10**9)) for _ in range(batch_size)]
        ids, mask = encoder.tokenize([clean_prompt(scene.caption) for scene in scenes], device)
        length = int(mask.sum(1).max())  # padding is masked out: trimming it changes no valid token's output
        ids, mask = ids[:, :length], mask[:, :length]
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        targets = torch.tensor([scene_targets(scene) for scene in scenes], device=device)
        loss, accuracy = heads.loss(hidden, mask.bool(), targets)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log.info("caption encoder step %d/%d: loss %.4f, token accuracy %.3f (%.1f steps/s)", step + 1, steps,
                     loss.item(), accuracy, (step + 1) / (time.perf_counter() - started))
    model.eval().requires_grad_(False)
    return accuracy
