"""Where weights come from: the public repositories, their file names and download commands, and the error a
missing or mismatched file raises. Light on purpose: the inspector and the registry check folders with it
before anything heavy is imported."""
from __future__ import annotations

WAN_REPO = "Wan-AI/Wan2.1-T2V-1.3B"
WAN_DIFFUSERS_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
SELF_FORCING_REPO = "gdhe17/Self-Forcing"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
WAN_BASE_DIR = "wan_models/Wan2.1-T2V-1.3B"  # where the configs look for the Wan2.1 base in a weights folder


class WeightsError(RuntimeError):
    """A weight file is missing or does not fit the model; the message says what to do."""


def hf_download(repo: str, *files: str, into: str = "<weights>") -> str:
    """The command that fetches `files` of `repo` (the whole repo without files) into a folder. `hf` is the
    command huggingface_hub installs (it replaced huggingface-cli)."""
    return " ".join(["hf download", repo, *files, "--local-dir", into])


WAN_BASE_DOWNLOAD = hf_download(WAN_REPO, into=f"<weights>/{WAN_BASE_DIR}")
