"""Progress and metrics: a tqdm bar on rank 0 and ``metrics.jsonl`` (one JSON object per
log step: loss, lr, grad norm, tokens/s, step time, peak memory, per-layer dX error of
CE-LoRA's last refresh step), appended with a flush per line."""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Metrics:
    def __init__(self, output_dir: Path, total_steps: int, start_step: int, is_main: bool, resumed: bool):
        self.is_main = is_main
        self.path = output_dir / "metrics.jsonl"
        self.bar = None
        if is_main:
            from tqdm.auto import tqdm

            output_dir.mkdir(parents=True, exist_ok=True)
            if not resumed and self.path.exists():
                self.path.unlink()  # a fresh run starts a fresh log; a resumed one appends
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
        self.t0 = time.perf_counter()
        self.tokens = 0

    def step(self, record: dict[str, Any], write: bool) -> None:
        """Advance the bar; write ``record`` to metrics.jsonl when ``write``."""
        if not self.is_main:
            return
        self.tokens += record.get("tokens", 0)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}",
                             refresh=False)
        if write:
            self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)
        sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def celora_record(model, step: int) -> dict[str, Any]:
    """CE-LoRA telemetry of optimizer step ``step`` for metrics.jsonl (call after on_optimizer_step).

    ``grad_rel_error``: ‖dX_approx − dX_exact‖ / ‖dX_exact‖ per approximate layer measured on
    this step (refresh steps), the vocab-sparse LM head included (its measurement steps);
    ``head_rel_error``: the head's entry again, at the top level; ``chosen_k``: per adaptive
    (keep "auto") layer, the k picked on this refresh step for the steps that follow, with
    ``chosen_keep`` = k / m. Empty when nothing was measured or chosen on this step.
    """
    from celora_dist import telemetry
    from celora_dist.head import VocabSparseLMHead
    from celora_dist.selection import scheduled_modules

    record: dict[str, Any] = {}
    errors = {name: t["rel_error"] for name, t in telemetry(model).items()
              if t["step"] == step and t["rel_error"] is not None}
    if errors:
        record["grad_rel_error"] = errors
    heads = [name for name, m in scheduled_modules(model) if isinstance(m, VocabSparseLMHead) and name in errors]
    if heads:
        record["head_rel_error"] = errors[heads[0]]
    # the full layer's k and m (a column-parallel TP layer's own are its shard's)
    chosen = {name: (getattr(m, "full_k", m.k), getattr(m, "full_out_features", m.out_features))
              for name, m in scheduled_modules(model)
              if getattr(m, "adaptive", False) and step % m.refresh_every == 0 and m.step == step + 1}
    if chosen:
        record["chosen_k"] = {name: k for name, (k, _) in chosen.items()}
        record["chosen_keep"] = {name: round(k / m, 4) for name, (k, m) in chosen.items()}
    return record
