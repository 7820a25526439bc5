"""Compilation results survive a restart: a fresh process with only the saved artifacts file reuses
the compiled graph instead of compiling it (inductor on the CPU; on a GPU, the app's block compilation
also benchmarks no kernel again)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import json, sys, torch
from pathlib import Path
from pipelines.model import compile_cache
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


RESTART_PROBE = """
import json, sys, torch
from pathlib import Path
from pipelines.model import compile_cache
from pipelines.model.acceleration import BLOCK_COMPILE_OPTIONS
from pipelines.model.transformer import CausalWanModel
from torch._dynamo.utils import counters
folder = Path(sys.argv[1])
loaded = compile_cache.activate(folder)
torch.manual_seed(0)
model = CausalWanModel(dim=256, ffn_dim=1024, num_heads=2, num_layers=2, text_len=32, text_dim=64)
model = model.to("cuda", torch.bfloat16).eval().requires_grad_(False)
model.compile_blocks(options=BLOCK_COMPILE_OPTIONS, dynamic=False)
with torch.no_grad():
    out = model(torch.randn(1, 16, 3, 16, 16, device="cuda"), torch.full((1, 3), 500.0, device="cuda"),
                model.encode_context(torch.randn(1, 32, 64, device="cuda")))
if not loaded:
    compile_cache.save(folder)
print(json.dumps({"loaded": loaded, "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"],
                  "tuned": counters["inductor"]["coordesc_tuning_bench"], "sum": float(out.float().sum())}))
"""


def _start(folder: Path, probe: str = PROBE) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", probe, str(folder)], env=env, capture_output=True, text=True,
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_restart_with_the_compile_cache_neither_compiles_nor_tunes_the_blocks_again(tmp_path):
    """The app's block compilation, restarted on its saved cache folder: every graph comes from the
    cache and no kernel is benchmarked again (coordinate-descent tuning re-ran on every start)."""
    first = _start(tmp_path / "cache", RESTART_PROBE)
    assert not first["loaded"] and first["misses"] >= 1
    second = _start(tmp_path / "cache", RESTART_PROBE)
    assert second["loaded"] and second["hits"] >= 1 and second["misses"] == 0
    assert first["tuned"] == second["tuned"] == 0
    assert second["sum"] == first["sum"]
