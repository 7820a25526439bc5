"""Flags a speed regression between two benchmark results.

    python bench/compare.py NEW.json BASELINE.json [--tolerance 0.05]

Understands bench_streaming.py results (fps_median, first_frames_s_median) and bench_memory.py
results (the same figures per profile). Exit status 1 when any figure is more than the
tolerance worse (lower FPS or a later first frame), 0 otherwise; every figure is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# figure -> True when larger is better
FIGURES = {"fps_median": True, "first_frames_s_median": False}


def figures(result: dict) -> dict[str, float]:
    """'figure' or 'profile/figure' -> value, for every comparable figure in a result file."""
    found = {name: float(result[name]) for name in FIGURES if name in result}
    for profile, values in (result.get("profiles") or {}).items():
        found.update({f"{profile}/{name}": float(values[name]) for name in FIGURES if name in values})
    return found


def compare(new: dict, baseline: dict, tolerance: float = 0.05) -> tuple[list[str], list[str]]:
    """(report lines, regressions) for the figures both results have."""
    new_figures, old_figures = figures(new), figures(baseline)
    lines, regressions = [], []
    for key in sorted(set(new_figures) & set(old_figures)):
        old, now = old_figures[key], new_figures[key]
        higher_is_better = FIGURES[key.rsplit("/", 1)[-1]]
        change = (now - old) / old if old else 0.0
        worse = -change if higher_is_better else change
        flag = "REGRESSION" if worse > tolerance else "ok"
        line = f"{flag:10s} {key}: {old:.4g} -> {now:.4g} ({change:+.1%})"
        lines.append(line)
        if flag == "REGRESSION":
            regressions.append(line)
    return lines, regressions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/compare.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("new", type=Path)
    parser.add_argument("baseline", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed relative slow-down (default 0.05)")
    args = parser.parse_args(argv)
    new, baseline = (json.loads(path.read_text()) for path in (args.new, args.baseline))
    if new.get("device") != baseline.get("device"):
        print(f"note: different devices ({new.get('device')} vs {baseline.get('device')})")
    lines, regressions = compare(new, baseline, args.tolerance)
    if not lines:
        print("no figures in common")
        return 2
    print("\n".join(lines))
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
