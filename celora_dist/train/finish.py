"""The end of a run: summary.json, the ``summary: ...`` line, the --dump-celora-state files.

The summary is what scripts read back (bench/, the tests): the set-up, the first and
last training loss, the held-out accuracy before and after, and where the adapter is.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .prepare import Job


def summarize(args: argparse.Namespace, job: Job, steps: int, train_time: float, losses: list[float],
              zero_shot: dict | None, final: dict | None) -> dict[str, Any]:
    """summary.json's content (None where a value was not measured: no eval, no steps run)."""
    output_dir = Path(args.output_dir)
    return {
        "method": args.method, "zero_stage": job.zero_stage, "world_size": job.world, "tp_size": job.tp,
        "steps": steps, "train_time_s": round(train_time, 2),
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "zero_shot_accuracy": (zero_shot or {}).get("accuracy"),
        "accuracy": (final or {}).get("accuracy"), "eval_loss": (final or {}).get("eval_loss"),
        "majority_rate": (final or zero_shot or {}).get("majority_rate"),
        "eval_examples": len(job.eval_records), "adapter": str(output_dir / "adapter"),
    }


def report(summary: dict[str, Any], output_dir: Path, train_time: float, is_main: bool) -> None:
    """Rank 0 writes summary.json and prints the ``summary:`` line; then every rank waits for it."""
    import torch.distributed as dist

    if is_main:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        acc = "" if summary["accuracy"] is None else f" | held-out accuracy {summary['accuracy']:.4f}"
        zs = "" if summary["zero_shot_accuracy"] is None else f" (zero-shot {summary['zero_shot_accuracy']:.4f})"
        print(f"summary: {summary['steps']} steps in {train_time:.1f} s | loss {summary['first_loss']:.4f} -> "
              f"{summary['last_loss']:.4f}{acc}{zs} | adapter {output_dir / 'adapter'}", flush=True)
    dist.barrier()


def dump_celora_state(model, output_dir: Path) -> Path:
    """--dump-celora-state: this rank's selected indices and step counters in
    OUTPUT/celora_state/rank<R>.pt (a checkpoint holds them too), and the frozen SVD factors
    it trains with, {layer: (B0, A0, ‖Ws[i, :]‖²)}, in factors_rank<R>.pt — gathered under
    ZeRO-3 (every rank enters each gather), a TP rank's shards as held — for tests and
    inspection: the ranks' factors must be one factorisation."""
    import torch
    import torch.distributed as dist

    from .. import celora_state_dict
    from ..layer import celora_layers
    from ..zero import gathered

    dump = output_dir / "celora_state"
    dump.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank()
    path = dump / f"rank{rank}.pt"
    torch.save(celora_state_dict(model), path)
    factors = {}
    for name, layer in celora_layers(model):
        if layer.B0 is not None:
            with gathered([layer.B0, layer.A0]):
                factors[name] = tuple(t.detach().cpu().clone() for t in (layer.B0, layer.A0, layer.ws_row_sq))
    torch.save(factors, dump / f"factors_rank{rank}.pt")
    return path
