"""Runs the Triton interpreter cases (tests/interp_kernel_cases.py) in a subprocess.

TRITON_INTERPRET=1 has to be in the environment before triton is first imported, and
this pytest process has imported triton already (peft does); so the cases run in a
fresh interpreter with the variable set. Every case must pass: a skip or an error
fails this test, and the count guards against the cases silently not being collected.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_CASES = 41


def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("CELORA_KERNEL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
         str(ROOT / "tests" / "interp_kernel_cases.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(rf"\b{EXPECTED_CASES} passed\b", summary), report
    assert not re.search(r"skipped|failed|error|xfail|xpass", summary), report
