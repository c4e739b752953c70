"""User errors and the config-file reader that every trainer module shares.

A leaf (standard library only): cli, engine, parallel, checkpoint, data and embedded
all raise :class:`UsageError` and read JSON/YAML files without importing one another.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class UsageError(ValueError):
    """Bad input from the user: printed as ``error: ...`` and exit status 2."""


class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss or gradient): printed as ``error: ...``, exit status 1."""


def exit_report(exc: Exception) -> tuple[str, int]:
    """(the line to print, the exit status) for an exception that ends a run the expected way;
    re-raises anything else (a bug keeps its traceback)."""
    if isinstance(exc, UsageError):
        return f"error: {exc}", 2
    if isinstance(exc, TrainingError):
        return f"error: {exc}", 1
    if isinstance(exc, StopRequested):
        return str(exc), exc.exit_status
    if isinstance(exc, RuntimeError) and is_collective_timeout(exc):
        return ("error: a collective operation did not complete within --dist-timeout: another rank stopped responding "
                f"(hung, stopped or lost). Continue from the last complete checkpoint with --resume OUTPUT_DIR "
                f"({str(exc).strip().splitlines()[-1][:200]})"), 1
    raise exc


def is_collective_timeout(exc: BaseException) -> bool:
    """A torch.distributed collective that hit the process group's timeout (gloo or NCCL wording)."""
    text = str(exc).lower()
    return "timed out waiting" in text or "collective operation timeout" in text


class StopRequested(Exception):
    """SIGTERM / Ctrl-C honoured at a step boundary (after a checkpoint): exit status 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum


def load_mapping(path: str, what: str) -> dict[str, Any]:
    """The JSON (or ``.yaml``/``.yml``) object in ``path``; errors name ``what`` (the flag) and the file."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{what}: no such file {path}")
    text = file.read_text()
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{what} {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except Exception as e:  # yaml.YAMLError and friends
        raise UsageError(f"{what} {path}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data
