"""The drift plot under the video: each block's statistics (pipelines/drift.py) as a line per statistic."""
from __future__ import annotations

import pandas as pd

from pipelines.drift import REFERENCE_BLOCKS

# Plotted relative to the mean of the run's first blocks (1 = unchanged); the score and similarity as they are.
RELATIVE = {"brightness": "brightness", "saturation": "saturation", "sharpness": "sharpness", "latent_rms": "latent RMS"}
ABSOLUTE = {"score": "drift score", "similarity": "colour similarity"}


class DriftPlot:
    """One run's drift rows as they arrive."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []

    def add(self, block: int, drift: dict | None) -> None:
        if drift is not None:
            self.rows.append((block, drift))

    def frame(self) -> pd.DataFrame:
        """Long-format rows (block, statistic, value) for gr.LinePlot."""
        reference = {key: sum(d[key] for _, d in self.rows[:REFERENCE_BLOCKS]) / max(1, len(self.rows[:REFERENCE_BLOCKS]))
                     for key in RELATIVE}
        records = []
        for block, drift in self.rows:
            records += [(block, name, drift[key]) for key, name in ABSOLUTE.items()]
            records += [(block, name, drift[key] / reference[key] if reference[key] else 0.0)
                        for key, name in RELATIVE.items()]
        return pd.DataFrame(records, columns=["block", "statistic", "value"])
