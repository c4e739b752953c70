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

# The fields of every training record; CE-LoRA telemetry (celora_record) adds others.
STEP_FIELDS = ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s", "peak_mem_mb")


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def step_record(engine, step: int, loss: float, tokens: int, lr: float, t0: float,
                dp_group: Any) -> dict[str, Any]:
    """The metrics.jsonl record of optimizer step ``step`` (``loss``: this rank's mean over its
    micro-batches, ``t0``: when the step started).

    Loss and token count are averaged / summed over the data-parallel group, not the world:
    the ranks of a TP group share one batch. The step time includes that all-reduce, and
    CE-LoRA's telemetry of the step (:func:`celora_record`) is merged in."""
    import torch
    import torch.distributed as dist

    stats = torch.tensor([loss, float(tokens)], dtype=torch.float64, device=engine.device)  # NCCL: on the GPU
    dist.all_reduce(stats, group=dp_group)
    step_time = time.perf_counter() - t0
    record = {"step": step, "loss": stats[0].item() / dist.get_world_size(dp_group), "lr": lr,
              "grad_norm": _float(engine.get_global_grad_norm()), "tokens": int(stats[1].item()),
              "tokens_per_s": stats[1].item() / step_time, "step_time_s": step_time,
              "peak_mem_mb": peak_memory_mb()}
    record.update(celora_record(engine.module, step))  # dX errors, head error, adaptive k on refresh steps
    return record


def has_telemetry(record: dict[str, Any]) -> bool:
    """True when CE-LoRA measured or chose something on this step (such records are always written)."""
    return any(key not in STEP_FIELDS for key in record)


def backend_summary(backends: dict[str, str]) -> str:
    """'90 torch, 30 exact (approximation did not pay)': a record's ``dx_backend`` counted."""
    counts: dict[str, int] = {}
    for backend in backends.values():
        counts[backend] = counts.get(backend, 0) + 1
    parts = [f"{n} {b}" + (" (approximation did not pay)" if b == "exact" else "")
             for b, n in sorted(counts.items(), key=lambda item: -item[1])]
    return ", ".join(parts) + f" of {len(backends)} layers"


def _float(x) -> float | None:
    """DeepSpeed's grad norm as a float (None when it has none: a tensor, float or None by stage)."""
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


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
    ``chosen_keep`` = k / m; ``dx_backend``: per layer whose dX backend was chosen by measurement
    on this step, "exact" (the approximation did not pay), "torch" or "triton". Empty when
    nothing was measured or chosen on this step.
    """
    from celora_dist import telemetry

    entries = telemetry(model)  # k and m are the full layer's (a column-parallel shard reports the union)
    record: dict[str, Any] = {}
    errors = {name: t["rel_error"] for name, t in entries.items()
              if t["step"] == step and t["rel_error"] is not None}
    if errors:
        record["grad_rel_error"] = errors
    heads = [name for name, t in entries.items() if t["kind"] == "lm_head" and name in errors]
    if heads:
        record["head_rel_error"] = errors[heads[0]]
    chosen = {name: (t["k"], t["m"]) for name, t in entries.items() if t["k_chosen_at"] == step}
    if chosen:
        record["chosen_k"] = {name: k for name, (k, _) in chosen.items()}
        record["chosen_keep"] = {name: round(k / m, 4) for name, (k, m) in chosen.items()}
    backends = {name: t["dx_backend"] for name, t in entries.items() if t.get("dx_backend_at") == step}
    if backends:
        record["dx_backend"] = backends
    return record
