"""Compilation results survive a restart: a fresh process with only the saved artifacts file reuses
the compiled graph instead of compiling it (inductor on the CPU; the GPU path uses the same calls)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import json, sys, torch
from pathlib import Path
from pipelines import compile_cache
folder = Path(sys.argv[1])
loaded = compile_cache.activate(folder)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
out = torch.compile(model)(torch.ones(4, 32))
from torch._dynamo.utils import counters
saved = None if loaded else compile_cache.save(folder)
print(json.dumps({"loaded": loaded, "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"], "saved": str(saved),
                  "sum": float(out.sum())}))
"""


def _start(folder: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", PROBE, str(folder)], env=env, capture_output=True, text=True,
                          timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_restart_with_only_the_saved_artifacts_reuses_the_compiled_graph(tmp_path):
    first = _start(tmp_path / "first")
    assert not first["loaded"] and first["misses"] >= 1 and first["hits"] == 0
    assert Path(first["saved"]).is_file()
    fresh = tmp_path / "fresh_machine"  # nothing but the artifacts file: inductor's own cache folder is empty
    fresh.mkdir()
    (fresh / "artifacts.bin").write_bytes(Path(first["saved"]).read_bytes())
    second = _start(fresh)
    assert second["loaded"] and second["hits"] >= 1 and second["misses"] == 0
    assert second["sum"] == first["sum"]
