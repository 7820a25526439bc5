"""How far one path's output moves from another's, from two `bench_streaming.py --save-reference` files.

    python bench/compare_references.py exact.pt other.pt

Prints the relative L2 error of the latents and the PSNR of the saved frames (every 10th) as JSON.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def latent_relative_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.float()
    return float((latents.float() - reference).norm() / reference.norm())


def psnr(frames: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of uint8 frames against reference frames of the same shape."""
    mse = float(np.mean((frames.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def compare(exact: dict, other: dict) -> dict:
    return {"latent_relative_error": latent_relative_error(other["latents"], exact["latents"]),
            "frames_psnr_db": psnr(other["frames"].numpy(), exact["frames"].numpy()),
            "frames_compared": int(exact["frames"].shape[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exact")
    parser.add_argument("other")
    args = parser.parse_args()
    print(json.dumps(compare(torch.load(args.exact), torch.load(args.other)), indent=2))


if __name__ == "__main__":
    main()
