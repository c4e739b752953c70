"""Runs the Triton kernel cases in subprocesses: interpreter numerics and AOT compilation.

- tests/interp_kernel_cases.py: TRITON_INTERPRET=1 has to be in the environment before
  triton is first imported, and this pytest process has imported triton already (peft
  does); so the cases run in a fresh interpreter with the variable set.
- tests/aot_compile_cases.py: compiles the kernels for sm_90 / sm_80 without a GPU,
  without the interpreter, into a fresh cache so every run really compiles.
Every case must pass: a skip or an error fails the test, and the count guards against
cases silently not being collected.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_cases(path: str, expected: int, env_updates: dict[str, str], drop: tuple[str, ...] = ()) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="2", **env_updates,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for name in ("CELORA_KERNEL", *drop):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", str(ROOT / path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(rf"\b{expected} passed\b", summary), report
    assert not re.search(r"skipped|failed|error|xfail|xpass", summary), report


def test_triton_kernels_under_interpreter():
    _run_cases("tests/interp_kernel_cases.py", 42, {"TRITON_INTERPRET": "1"})


def test_triton_kernels_compile_for_gpus(tmp_path):
    _run_cases("tests/aot_compile_cases.py", 3, {"TRITON_CACHE_DIR": str(tmp_path)}, drop=("TRITON_INTERPRET",))
