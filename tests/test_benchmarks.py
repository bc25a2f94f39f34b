"""Every script in benchmarks/ has a `--smoke` mode, and (slow tier) each smoke run succeeds.

The scripts are found by glob, so a new benchmark must declare `--smoke` too (the fast test fails
until it does): a benchmark that nothing runs rots (batch_bench.py once crashed for weeks).
A smoke run is meant to finish in under a minute on 2 cores; the timeout leaves room for a loaded
machine. A script that truly cannot have a smoke run would be listed here with xfail and a reason:
none is.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))
SMOKE_TIMEOUT_S = 240


def argparse_options(script: Path) -> set[str]:
    """The option strings of every `add_argument(...)` call in the script (read from its AST)."""
    options = set()
    for node in ast.walk(ast.parse(script.read_text(), filename=str(script))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            options |= {
                a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
            }
    return options


def test_benchmark_scripts_are_found():
    assert len(SCRIPTS) >= 9 and REPO / "benchmarks/batch_bench.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_benchmark_declares_smoke(script: Path):
    assert "--smoke" in argparse_options(script), (
        f"benchmarks/{script.name} needs a --smoke mode (< 1 min on 2 cores) that tests/test_benchmarks.py runs"
    )
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    assert "--smoke" in doc, f"benchmarks/{script.name}: its docstring should show the --smoke command"


@pytest.mark.slow  # each smoke run starts Python, builds the tiny model; some start Ray (10-60 s each)
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_benchmark_smoke_runs(script: Path, tmp_path: Path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # gpu_check's smoke runs on CPU, GPU or not
    t0 = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(script), "--smoke"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
    )
    seconds = time.perf_counter() - t0
    assert result.returncode == 0, (
        f"{script.name} --smoke failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    print(f"{script.name} --smoke: {seconds:.0f} s")
