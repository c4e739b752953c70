"""Shared benchmark plumbing: interleaved median timing and markdown tables."""
from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from a checkout
    sys.path.insert(0, str(ROOT))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(cases: dict[str, Callable[[], object]], repeats: int, device: str,
                        warmup: int = 1) -> dict[str, float]:
    """Median seconds per case; cases run round-robin so load drift hits all alike."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def iqr(values: list[float]) -> float:
    """Interquartile range: the spread to read a median against (0 for one sample)."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def markdown_table(rows: list[dict], columns: list[str], formats: dict[str, str]) -> str:
    """A markdown table of ``rows``; a NaN cell (nothing measured) prints as "-"."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c], formats.get(c, "{}")) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value, spec: str) -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else spec.format(value)


def machine_line(device: str, dtype: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else _cpu_model()
    return (f"device={device} ({name}) dtype={dtype} torch={torch.__version__} "
            f"threads={torch.get_num_threads()}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"
