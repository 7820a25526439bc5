"""The layers import downwards only: pipelines/ (the core) knows nothing of where streams run (serving/), the app
(demo/) or training/; serving/ knows nothing of the app."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level package of every absolute import in the package's modules, per module."""
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_pipelines_imports_neither_demo_nor_training():
    upward = {module: names & {"demo", "serving", "training", "app"}
              for module, names in imported_packages("pipelines").items()}
    assert not any(upward.values()), {m: n for m, n in upward.items() if n}


def test_serving_does_not_import_the_app():
    upward = {module: names & {"demo", "training", "app"} for module, names in imported_packages("serving").items()}
    assert not any(upward.values()), {m: n for m, n in upward.items() if n}


def test_the_scan_sees_imports_across_layers():
    """Control: the app's own modules import pipelines, and the scan finds it."""
    assert any("pipelines" in names for names in imported_packages("demo").values())
    assert any("pipelines" in names for names in imported_packages("training").values())
    assert any("serving" in names for names in imported_packages("demo").values())
