"""Running launch/train.py from a benchmark: its own process per run, or in this one.

One process per run (the default) keeps runs isolated, as a user would start them;
in-process (``launch/train.py``'s ``main(argv)``) saves the ~10 s import per run for
the smoke tests.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from celora_dist.train.engine import free_port  # noqa: E402 (this checkout's, after the path above)
TRAIN = ROOT / "launch" / "train.py"

_TRAIN_MODULE = None


def run_env() -> dict[str, str]:
    """The trainer's environment: CPU DeepSpeed, offline, this checkout first, no stale rank vars."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    env.update(DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _train_main(argv: list[str]) -> None:
    """launch/train.py's main(argv) in this process (its progress output goes to stderr)."""
    global _TRAIN_MODULE
    if _TRAIN_MODULE is None:
        spec = importlib.util.spec_from_file_location("celora_launch_train", TRAIN)
        _TRAIN_MODULE = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_TRAIN_MODULE)
    with contextlib.redirect_stdout(sys.stderr):
        _TRAIN_MODULE.main(argv)


def run_trainer(flags: list[str], out: Path, log: Callable[[str], None], in_process: bool = False,
                nproc: int = 1, env: dict[str, str] | None = None) -> list[dict]:
    """Train into ``out``; returns the records of its metrics.jsonl. Exits with the log tail on failure.

    ``nproc`` > 1 starts the ranks through DeepSpeed's launcher (on this machine's CPUs or GPUs);
    ``env`` adds to :func:`run_env`."""
    # the benchmarks own their run folders: a re-run replaces an unfinished one
    tail = [str(TRAIN), *flags, "--output-dir", str(out), "--overwrite-output-dir"]
    cmd = [sys.executable, *tail] if nproc == 1 else [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
        str(free_port()), *tail]
    log(f"$ {' '.join(cmd[1:])}")
    if in_process:
        if nproc != 1:
            raise ValueError("in_process runs one rank")
        _train_main(tail[1:])
    else:
        proc = subprocess.run(cmd, cwd=ROOT, env={**run_env(), **(env or {})}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: run failed (rc={proc.returncode}): {' '.join(cmd)}\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
