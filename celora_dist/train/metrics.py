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
