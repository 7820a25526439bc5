"""Optional prompt extension with a local instruction-tuned causal LM (e.g. a Qwen instruct model).

Self-Forcing was trained on long, detailed captions and follows them much better than short
prompts; its authors extend short prompts with an LLM. Any folder that transformers'
AutoModelForCausalLM and AutoTokenizer load, with a chat template, works. The model is loaded
on first use, runs greedily (same prompt -> same text) and each result is cached.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_FOLDER = "prompt_extender"
SYSTEM_PROMPT = (
    "You rewrite short video prompts into the detailed captions a text-to-video model was trained on. "
    "Write one paragraph of 80 to 120 words in the present tense that describes what is visible: the "
    "subject and its appearance, the action and its motion, the setting, the lighting, the colours and the "
    "camera (shot size and movement). Keep every detail the user gave and invent nothing that contradicts "
    "it. No lists, no headings, no quotation marks, no preamble: reply with the caption only.")


class ExtenderError(RuntimeError):
    """The extender folder is missing or unusable; the message says which file and what to do."""


def find_extender_folder(weights_dir: Path | None, configured: str | None = None) -> Path | None:
    """The configured folder (relative to the weights folder), else <weights>/prompt_extender, else the
    first sub-folder of the weights folder whose config.json declares a *ForCausalLM architecture."""
    if configured:
        path = Path(configured).expanduser()
        return path if path.is_absolute() or weights_dir is None else weights_dir / path
    if weights_dir is None or not weights_dir.is_dir():
        return None
    if (weights_dir / DEFAULT_FOLDER).is_dir():
        return weights_dir / DEFAULT_FOLDER
    for candidate in sorted(p for p in weights_dir.iterdir() if (p / "config.json").is_file()):
        try:
            architectures = json.loads((candidate / "config.json").read_text()).get("architectures") or []
        except (OSError, ValueError):
            continue
        if any(name.endswith("ForCausalLM") for name in architectures):
            return candidate
    return None


def extender_device(pipeline_device: torch.device, profile_name: str | None) -> torch.device:
    """The GPU while every weight fits there anyway (profile high), else the CPU: an 8 GB card
    streaming its generator has no room for a language model beside it."""
    return pipeline_device if pipeline_device.type == "cuda" and profile_name == "high" else torch.device("cpu")


class PromptExtender:
    """Greedy, cached prompt rewriting; thread-safe, loads the model once on first use."""

    def __init__(self, folder: Path, max_new_tokens: int = 200, cache_size: int = 256) -> None:
        self.folder = Path(folder)
        self.max_new_tokens = max_new_tokens
        self.cache_size = cache_size
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self._model = None
        self._tokenizer = None

    def describe(self) -> str:
        return f"prompt extender {self.folder.name} ({self.folder})"

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not (self.folder / "config.json").is_file():
            raise ExtenderError(f"Prompt extender: {self.folder / 'config.json'} does not exist. Download an "
                                f"instruction-tuned causal LM (for example Qwen/Qwen2.5-1.5B-Instruct) into "
                                f"{self.folder}.")
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(self.folder, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ExtenderError(f"Prompt extender: could not load {self.folder} ({type(err).__name__}: "
                                f"{str(err).splitlines()[0][:200]}). Re-download the model folder.") from err
        if not getattr(tokenizer, "chat_template", None):
            raise ExtenderError(f"Prompt extender: {self.folder} has no chat template (tokenizer_config.json / "
                                f"chat_template.jinja); use an instruction-tuned ('-Instruct') model.")
        self._model, self._tokenizer = model.eval().requires_grad_(False), tokenizer

    def extend(self, prompt: str, device: torch.device | str = "cpu") -> str:
        """The detailed version of `prompt` (computed once per distinct prompt).

        The model runs on `device` and goes back to the CPU afterwards, so GPU memory is only
        borrowed while it writes. Raises ExtenderError when the folder cannot be used.
        """
        key = prompt.strip()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            if self._model is None:
                self._load()
            text = self._generate(key, torch.device(device))
            self._cache[key] = text
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        log.info("extended prompt (%d -> %d characters)", len(key), len(text))
        return text

    @torch.no_grad()
    def _generate(self, prompt: str, device: torch.device) -> str:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        tokenizer, model = self._tokenizer, self._model
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model.to(device=device, dtype=dtype)
        try:
            output = model.generate(**{k: v.to(device) for k, v in inputs.items()}, do_sample=False,
                                    max_new_tokens=self.max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        finally:
            if device.type != "cpu":
                model.to("cpu")
                torch.cuda.empty_cache()
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        text = " ".join(tokenizer.decode(new_tokens, skip_special_tokens=True).split())
        return text or prompt  # a model that answers nothing leaves the prompt as it was
