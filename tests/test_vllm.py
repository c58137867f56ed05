"""specprobe's proposer inside vLLM (CPU): its greedy outputs equal vLLM's own without speculation,
token for token, with drafts accepted, one request at a time and two at once.

vLLM lives in an environment of its own (scripts/install_vllm.sh makes .venv-vllm, which
scripts/install.sh runs); this test drives the bench's vLLM rows there in a subprocess, with
enforce_eager (vLLM starts in about 30 s instead of 150 s; the proposer sees the same calls).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = Path(os.environ.get("SPECPROBE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))

pytestmark = [
    pytest.mark.xdist_group("vllm"),
    pytest.mark.skipif(not PYTHON.exists(), reason=f"no vLLM environment at {PYTHON} (bash scripts/install_vllm.sh)"),
]


def test_specprobe_proposer_in_vllm_equals_vllm_greedy(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [str(PYTHON), "-m", "specprobe.bench.vllm_rows", "--model", "smollm2-135m", "--rows", "vllm,vllm-specprobe-hybrid",
           "--categories", "summarization,rag", "--per-category", "2", "--max-new-tokens", "32",
           "--batch", "2", "--eager", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["row"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"vllm", "vllm-specprobe-hybrid"}, done.stderr[-3000:]
    for ref, run in zip(results["vllm"]["runs"], results["vllm-specprobe-hybrid"]["runs"]):
        assert ref["batch"] == run["batch"]
        assert len(run["outputs"]) == 2 and all(len(o) > 0 for o in run["outputs"])
        assert run["outputs"] == ref["outputs"], f"batch {run['batch']}: the proposer changed vLLM's greedy output"
        assert run["counters"].get("num_accepted_tokens", 0) > 0, f"batch {run['batch']}: no draft accepted ({run['counters']})"
    assert "| vllm-specprobe-hybrid | 2 |" in done.stdout
