"""Benchmarks are not tests, but they must not rot: each one is run with `--help`, which imports
everything it uses from vit_core (and from the benchmark beside it), so an API change that breaks
one fails here instead of on the day someone measures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_every_benchmark_imports_and_answers_help():
    assert len(BENCHMARKS) >= 8
    # This checkout's vit_core, as `pip install -e .` provides it. One after the other: side by side
    # they only contend for the cores (about a second each, mostly importing torch).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    failed = {}
    for path in BENCHMARKS:
        result = subprocess.run([sys.executable, str(path), "--help"], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=180)
        if result.returncode != 0 or "usage:" not in result.stdout:
            failed[path.name] = result.stderr.strip().splitlines()[-1:] or result.stdout[-200:]
    assert not failed, failed
