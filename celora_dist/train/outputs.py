"""The output folder belongs to one run: never destroy an earlier run without being told to.

A fresh run refuses an ``--output-dir`` that already holds a run (its metrics, summary,
adapter, checkpoints) before any work starts, naming the two ways on: ``--resume`` to
continue it, or ``--overwrite-output-dir`` to replace it. Replacing is two-phase: the
earlier run's files are moved aside into ``OUTPUT/.previous-run-<time>/`` when the new
run starts writing, and deleted only once the new run's first checkpoint is complete;
if the new run dies before that, the earlier run is still there. Files that are not
a run's (a user's notes, a data file) are never moved or deleted.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .errors import UsageError

RUN_FILES = ("metrics.jsonl", "summary.json", "adapter", "checkpoints", "celora_state")
PREVIOUS_PREFIX = ".previous-run-"


def run_files(output_dir: Path) -> list[str]:
    """The names of a run's files present in ``output_dir`` (empty: no run there)."""
    return [name for name in RUN_FILES if (output_dir / name).exists()]


def check_output_dir(output_dir: str, resume: str | None, resume_dir: Path | None, overwrite: bool) -> None:
    """Refuse an output path that is a file, or that holds a run this invocation would clobber."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {output_dir}: is a file, not a folder")
    if overwrite and resume is not None:
        raise UsageError("give --resume (continue the run in --output-dir) or --overwrite-output-dir "
                         "(replace it), not both")
    found = run_files(out) if out.is_dir() else []
    if not found or overwrite:
        return
    if resume is not None:
        if Path(resume_dir).resolve() in (out.resolve(), (out / "checkpoints").resolve()):
            return  # continuing the run that lives here
        raise UsageError(f"--output-dir {output_dir} already holds another run ({', '.join(found)}); "
                         f"resume {resume} into its own folder (--output-dir {Path(resume_dir).parent}) "
                         f"or into an empty one")
    raise UsageError(f"--output-dir {output_dir} already holds a run ({', '.join(found)}); continue it with "
                     f"--resume {output_dir}, replace it with --overwrite-output-dir (it is deleted once the "
                     f"new run's first checkpoint exists), or choose another --output-dir")


def set_aside_previous_run(output_dir: Path) -> Path | None:
    """Move an earlier run's files into ``OUTPUT/.previous-run-<time>/``; None when there are none.

    Called by global rank 0 right before the new run writes its first file."""
    found = run_files(output_dir)
    if not found:
        return None
    aside = output_dir / f"{PREVIOUS_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    aside.mkdir()
    for name in found:
        os.replace(output_dir / name, aside / name)
    return aside


def remove_previous_run(aside: Path) -> None:
    """Delete the set-aside run (the new run has a complete checkpoint of its own)."""
    shutil.rmtree(aside, ignore_errors=True)
