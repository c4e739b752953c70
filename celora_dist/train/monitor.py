"""Standard logging through DeepSpeed's monitor: TensorBoard, CSV and Weights & Biases.

``--report-to tensorboard,csv,wandb`` adds the matching sections (``tensorboard``,
``csv_monitor``, ``wandb``) to the DeepSpeed config, writing under ``OUTPUT/logs``; a
section already in the user's config is kept as written. Each optimizer step's record —
loss, lr, grad norm, tokens/s and CE-LoRA's telemetry (per-layer relative dX error on
refresh steps, the LM head's error, adaptive keeps) — goes to ``engine.monitor`` as
events at that step; ``metrics.jsonl`` stays the complete record.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .errors import UsageError

SECTIONS = {"tensorboard": "tensorboard", "csv": "csv_monitor", "wandb": "wandb"}
NEEDS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # reporter -> the package it imports
SCALARS = (("loss", "Train/loss"), ("lr", "Train/lr"), ("grad_norm", "Train/grad_norm"),
           ("tokens_per_s", "Train/tokens_per_s"), ("head_rel_error", "CELoRA/head_rel_error"))


def parse_report_to(value: str) -> list[str]:
    """``"tensorboard,csv"`` -> ["tensorboard", "csv"]; "none" -> []; UsageError naming an unknown one."""
    names = [v.strip() for v in value.split(",") if v.strip() and v.strip() != "none"]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise UsageError(f"--report-to: unknown reporter(s) {unknown}; choose from {sorted(SECTIONS)} or none")
    missing = [NEEDS[n] for n in names if n in NEEDS and importlib.util.find_spec(NEEDS[n]) is None]
    if missing:
        raise UsageError(f"--report-to needs the {missing} package(s): pip install {' '.join(missing)}")
    return names


def add_reporters(ds_config: dict[str, Any], reporters: list[str], output_dir: Path) -> None:
    """Enable DeepSpeed's monitor sections for ``reporters`` (user-written sections win)."""
    for name in reporters:
        section = SECTIONS[name]
        if section in ds_config:
            continue
        entry = {"enabled": True}
        if name == "wandb":
            entry["project"] = "celora-dist"
        else:
            entry.update(output_path=str(output_dir / "logs") + "/", job_name=name)
        ds_config[section] = entry


def events(record: dict[str, Any]) -> list[tuple[str, float, int]]:
    """DeepSpeed monitor events (tag, value, step) of one metrics record."""
    step = record["step"]
    out = [(tag, float(record[key]), step) for key, tag in SCALARS if record.get(key) is not None]
    errors = record.get("grad_rel_error", {})
    out += [(f"CELoRA/dx_rel_error/{name}", float(v), step) for name, v in errors.items()]
    if errors:
        out.append(("CELoRA/dx_rel_error_mean", sum(errors.values()) / len(errors), step))
    out += [(f"CELoRA/chosen_keep/{name}", float(v), step) for name, v in record.get("chosen_keep", {}).items()]
    backends = record.get("dx_backend", {})
    if backends:  # share of the layers chosen on this step that run the approximation
        out.append(("CELoRA/dx_approximate_share", sum(b != "exact" for b in backends.values()) / len(backends), step))
    return out
