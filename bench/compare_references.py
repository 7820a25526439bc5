"""How far one path's output moves from another's, from two `bench_streaming.py --save-reference` files.

    python bench/compare_references.py exact.pt other.pt

Prints the relative L2 error of the latents and the PSNR of the saved frames (every 10th) as JSON.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def compare(exact: dict, other: dict) -> dict:
    reference, latents = exact["latents"].float(), other["latents"].float()
    frames_a, frames_b = (d["frames"].numpy().astype(np.float64) for d in (exact, other))
    mse = float(np.mean((frames_a - frames_b) ** 2))
    return {"latent_relative_error": float((latents - reference).norm() / reference.norm()),
            "frames_psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse)),
            "frames_compared": int(frames_a.shape[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exact")
    parser.add_argument("other")
    args = parser.parse_args()
    print(json.dumps(compare(torch.load(args.exact), torch.load(args.other)), indent=2))


if __name__ == "__main__":
    main()
