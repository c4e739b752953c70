"""Measured backend choice: each approximate layer runs whichever of exact dense dX, the
torch gather path or Triton is fastest for it (docs/design.md §3, "Never slower").

The FLOP count says the gathered product is cheaper; whether it is *faster* depends on
the shape, k, device, dtype and thread count (at 2 CPU threads a small k/v projection
lost to the dense GEMM, 0.44–0.59×, on a loaded machine). So a layer measures instead
of predicting: on its first approximate backward after k is set, it times every
candidate on the real tensors of that backward (one warm-up call, then
``REPEATS`` interleaved calls each, medians), and the candidates' medians are summed
over the data-parallel group with the schedule's statistics all-reduce, so every rank
makes the same choice from the same numbers. An approximate backend must beat exact
by ``MARGIN`` to be chosen: inside the noise, exact (no error) wins.

``CELORA_KERNEL=torch|triton`` skips the measurement and forces that approximate
backend (``kernels.dispatch``); ``auto`` (the default) measures.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch
from torch import Tensor

from .dispatch import kernel_backend, measured_backends

# Every backend a layer can run, in the fixed order of the synced timing vector.
BACKENDS = ("exact", "torch", "triton")
# Timed calls per candidate after one warm-up. The measurement costs (1 + REPEATS) dX calls
# per candidate once per k: at REPEATS = 5 the measuring step of SmolLM2-135M at 4096 tokens
# took 67 s against a 40 s step on 2 CPU threads; a median of 3 still ignores one outlier.
REPEATS = 3
# An approximation must be this much faster than exact to be used. The spread of one
# GEMM's time between back-to-back calls on the 2-core CPU is ~2–5% (idle machine).
MARGIN = 0.05

Clock = Callable[[], float]
Runs = dict[str, Callable[[], object]]


def median_times(runs: Runs, clock: Clock = time.perf_counter, repeats: int = REPEATS,
                 sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds per call of each run: one warm-up call each, then ``repeats``
    rounds in which every run is called once (interleaved, so drift hits all alike).
    ``sync`` waits for queued device work before each clock read (CUDA)."""
    sync = sync or (lambda: None)
    for run in runs.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync()
            start = clock()
            run()
            sync()
            samples[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def pick_backend(times: dict[str, float], margin: float = MARGIN) -> str:
    """The fastest approximate backend if it beats "exact" by ``margin``, else "exact".
    Non-finite times (a backend unavailable on some rank) never win."""
    approx = {name: t for name, t in times.items() if name != "exact" and math.isfinite(t)}
    if not approx:
        return "exact"
    best = min(approx, key=approx.get)
    exact = times.get("exact", math.inf)
    return best if approx[best] < (1.0 - margin) * exact else "exact"


def device_sync(device: torch.device) -> Callable[[], None] | None:
    """What ``median_times`` must call around each clock read on ``device``."""
    return torch.cuda.synchronize if device.type == "cuda" else None


class BackendChoice:
    """One layer's measured backend: None until measured for the current k.

    Life cycle (driven by the layer): ``reset()`` when k changes; on the next
    approximate backward ``wants_measurement()`` is True and the layer hands its
    local medians to ``record()``; the schedule sums ``pending_statistics()`` over
    the DP group, ``load_synced()`` takes the sum and ``decide()`` picks.
    ``clock`` is injectable so tests can script the measured times.
    """

    def __init__(self, clock: Clock = time.perf_counter) -> None:
        self.clock = clock
        self.key: int | None = None  # the k the choice is for
        self.chosen: str | None = None
        self.chosen_at: int | None = None  # the optimizer step whose measurement chose it
        self.times: dict[str, float] | None = None  # the (DP-summed) medians behind ``chosen``
        self._pending: Tensor | None = None

    def reset(self) -> None:
        self.chosen = self.chosen_at = self.times = self._pending = None

    def ensure_key(self, key: int) -> None:
        """Forget the choice when k changed: the gathered product's cost depends on it."""
        if key != self.key:
            self.reset()
            self.key = key

    def forced(self, device_type: str) -> str | None:
        """The backend CELORA_KERNEL forces ("torch"/"triton"), None when it says measure."""
        return None if measured_backends() else kernel_backend(device_type)

    def active(self, device_type: str) -> str:
        """The backend to run now: forced, else measured, else (before the measurement)
        the default approximate backend of the device — the same on every rank."""
        return self.forced(device_type) or self.chosen or kernel_backend(device_type)

    def wants_measurement(self, device_type: str) -> bool:
        if self.chosen is not None and self.chosen not in self.candidates(device_type):
            self.reset()  # restored from a run on another device (e.g. "triton" from a GPU, now on CPU)
        return self.forced(device_type) is None and self.chosen is None and self._pending is None

    def candidates(self, device_type: str) -> tuple[str, ...]:
        """Backends to time on this device: exact, torch, and Triton where it compiles (CUDA)."""
        return ("exact", "torch", "triton") if kernel_backend(device_type) == "triton" else ("exact", "torch")

    def measure(self, runs: Runs, device: torch.device) -> None:
        """Time ``runs`` (backend name → zero-argument call) and keep the medians pending."""
        self.record(median_times(runs, self.clock, sync=device_sync(device)), device)

    def record(self, times: dict[str, float], device: torch.device | str = "cpu") -> None:
        """Keep medians pending, as the fixed-order vector the DP all-reduce sums (NaN: not run)."""
        vector = [times.get(name, math.nan) for name in BACKENDS]
        self._pending = torch.tensor(vector, dtype=torch.float32, device=device)

    def pending_statistics(self) -> Tensor | None:
        return self._pending

    def discard(self) -> None:
        """Drop a pending measurement (its step was skipped): the next approximate backward re-measures."""
        self._pending = None

    def load_synced(self, stats: Tensor) -> None:
        self._pending = stats.detach().to("cpu", torch.float32)

    def decide(self, step: int) -> None:
        """Choose from the pending (synced) medians measured on ``step``; no-op when none are pending."""
        if self._pending is None:
            return
        self.times = {name: float(t) for name, t in zip(BACKENDS, self._pending.tolist()) if math.isfinite(t)}
        self.chosen, self.chosen_at = pick_backend(self.times), step
        self._pending = None

    def telemetry(self) -> dict[str, object]:
        """``dx_backend`` (None until measured; "exact" = the approximation did not pay and the
        layer runs the dense dX), ``dx_backend_at`` (the step measured) and ``dx_backend_ms``
        (the medians it was chosen from, summed over the DP ranks)."""
        ms = None if self.times is None else {name: round(t * 1e3, 4) for name, t in self.times.items()}
        return {"dx_backend": self.chosen, "dx_backend_at": self.chosen_at, "dx_backend_ms": ms}

    def state(self) -> dict[str, object] | None:
        """What a checkpoint carries so a resumed run keeps the agreed choice (None: not chosen)."""
        return None if self.chosen is None else {"k": self.key, "backend": self.chosen}

    def load_state(self, state: dict[str, object] | None) -> None:
        self.reset()
        self.key = None
        if state is not None:
            self.key, self.chosen = int(state["k"]), str(state["backend"])
