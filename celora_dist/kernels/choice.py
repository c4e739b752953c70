"""Measured backend choice: each approximate layer runs whichever of exact dense dX, the
torch gather path or Triton is fastest for it (docs/design.md §3, "Never slower").

The FLOP count says the gathered product is cheaper; whether it is *faster* depends on
the shape, k, device, dtype and thread count (at 2 CPU threads a small k/v projection
lost to the dense GEMM, 0.44–0.59×, on a loaded machine). So a layer measures instead
of predicting: on its first approximate backward after k is set, it times every
candidate on the real tensors of that backward (one warm-up call each, then
``REPEATS`` interleaved rounds, medians; on CUDA each round times ``CUDA_CALLS``
back-to-back calls with CUDA events), and the candidates' medians are summed over the
data-parallel group with the schedule's statistics all-reduce, so every rank makes the
same choice from the same numbers. An approximate backend must beat exact by
``MARGIN`` to be chosen: inside the noise, exact (no error) wins. A Triton candidate
whose kernel failed (``fallback.py``) is timed as NaN: unavailable, never chosen.

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

from .fallback import agreed as failure_agreed
from .fallback import failed as failed_here
from .dispatch import configured_backend, kernel_backend, measured_backends

# Every backend a layer can run, in the fixed order of the synced timing vector.
BACKENDS = ("exact", "torch", "triton")
# Timed calls per candidate after one warm-up. The measurement costs (1 + REPEATS) dX calls
# per candidate once per k: at REPEATS = 5 the measuring step of SmolLM2-135M at 4096 tokens
# took 67 s against a 40 s step on 2 CPU threads; a median of 3 still ignores one outlier.
REPEATS = 3
# An approximation must be this much faster than exact to be used. The spread of one
# GEMM's time between back-to-back calls on the 2-core CPU is ~2–5% (idle machine).
MARGIN = 0.05
# CUDA: back-to-back calls per timed sample. One dX call of a small projection is tens of
# microseconds of GPU work, the size of one launch's host overhead and of a host clock read
# around a synchronize, which the old single synchronized call mostly measured. Between two
# events N calls queue behind each other, so the sample is the GPU's time per call (plus the
# launch gaps a real step also has). The measurement costs 1 + REPEATS·N calls per candidate,
# once per k.
CUDA_CALLS = 5

Clock = Callable[[], float]
Runs = dict[str, Callable[[], object]]


def median_times(runs: Runs, clock: Clock = time.perf_counter, repeats: int = REPEATS) -> dict[str, float]:
    """Median seconds per call of each run on the host clock (CPU): one warm-up call each,
    then ``repeats`` rounds in which every run is called once (interleaved, so drift hits
    all alike)."""
    for run in runs.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = clock()
            run()
            samples[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def event_median_times(runs: Runs, repeats: int = REPEATS, calls: int = CUDA_CALLS,
                       event: Callable[[], object] | None = None,
                       synchronize: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds per call of each run on the device (CUDA events): one warm-up call each
    (Triton compiles and autotunes there), then ``repeats`` interleaved rounds, each timing
    ``calls`` back-to-back calls of one run between two events; one synchronize at the end.
    ``event``/``synchronize`` default to ``torch.cuda.Event(enable_timing=True)`` and
    ``torch.cuda.synchronize`` (injectable: tests drive this without a GPU)."""
    event = event or (lambda: torch.cuda.Event(enable_timing=True))
    synchronize = synchronize or torch.cuda.synchronize
    for run in runs.values():
        run()
    marks: dict[str, list[tuple[object, object]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start, end = event(), event()
            start.record()
            for _ in range(calls):
                run()
            end.record()
            marks[name].append((start, end))
    synchronize()
    return {name: statistics.median(start.elapsed_time(end) / 1e3 / calls for start, end in pairs)
            for name, pairs in marks.items()}


def pick_backend(times: dict[str, float], margin: float = MARGIN) -> str:
    """The fastest approximate backend if it beats "exact" by ``margin``, else "exact".
    Non-finite times (a backend unavailable on some rank) never win."""
    approx = {name: t for name, t in times.items() if name != "exact" and math.isfinite(t)}
    if not approx:
        return "exact"
    best = min(approx, key=approx.get)
    exact = times.get("exact", math.inf)
    return best if approx[best] < (1.0 - margin) * exact else "exact"


def measuring_step(step: int, refresh_every: int) -> bool:
    """The first approximate step after each refresh: where k last changed, so where a layer
    without synced indices measures and all-reduces its timings. Depends only on the step
    counter and the config, which every rank shares."""
    return refresh_every > 1 and step % refresh_every == 1


class BackendChoice:
    """One layer's measured backend: None until measured for the current k.

    Life cycle (driven by the layer): ``reset()`` when k changes; on the next
    approximate backward ``wants_measurement()`` is True and the layer hands its
    local medians to ``record()``; the schedule sums ``pending_statistics()`` (or, for
    a layer without synced indices, the fixed-size ``slot()``) over the DP group,
    ``load_synced()`` (``load_synced_slot()``) takes the sum and ``decide()`` picks.
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

    def wants_measurement(self, device_type: str, may_measure: bool = True) -> bool:
        """Whether this backward must time the candidates. ``may_measure`` False: not on this step
        (a layer without synced indices measures only on its rank-independent measuring step)."""
        if self.chosen is not None and self.chosen not in self.candidates(device_type):
            if self.chosen == "triton" and self.times is not None and failure_agreed("grad_input"):
                # Triton failed on some rank: the next best of the same summed medians, on every rank
                self.chosen = pick_backend({name: t for name, t in self.times.items() if name != "triton"})
            else:
                self.reset()  # restored from a run on another device (e.g. "triton" from a GPU, now on CPU)
        return may_measure and self.forced(device_type) is None and self.chosen is None and self._pending is None

    def candidates(self, device_type: str) -> tuple[str, ...]:
        """Backends to time on this device: exact, torch, and Triton where it compiles (CUDA) and
        has not failed on any rank (the agreed state: every rank has the same candidates)."""
        triton = configured_backend(device_type) == "triton" and not failure_agreed("grad_input")
        return ("exact", "torch", "triton") if triton else ("exact", "torch")

    def measure(self, runs: Runs, device: torch.device) -> None:
        """Time ``runs`` (backend name → zero-argument call) and keep the medians pending: CUDA
        events on CUDA, ``clock`` elsewhere. A Triton run whose kernel failed here, before or
        during the measurement, is recorded as NaN (unavailable: the summed time is NaN on
        every rank, so no rank chooses it)."""
        runs = {name: run for name, run in runs.items() if not (name == "triton" and failed_here("grad_input"))}
        times = event_median_times(runs) if device.type == "cuda" else median_times(runs, self.clock)
        if failed_here("grad_input"):
            times.pop("triton", None)
        self.record(times, device)

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

    def slot(self, device: torch.device | str) -> Tensor:
        """The fixed-size [medians | count] vector a layer without synced indices all-reduces on its
        measuring step: count 1 with this rank's medians when it measured, zeros otherwise (whether
        a rank measured depends on its own k, so the shape must not)."""
        if self._pending is None:
            return torch.zeros(len(BACKENDS) + 1, dtype=torch.float32, device=device)
        return torch.cat([self._pending.to(device), self._pending.new_ones(1).to(device)])

    def load_synced_slot(self, stats: Tensor) -> None:
        """Take the summed slots: when any rank measured, every rank decides from the sum of the
        medians of the ranks that measured (the same choice everywhere); else nothing is pending."""
        stats = stats.detach().to("cpu", torch.float32)
        self._pending = stats[:-1] if float(stats[-1]) > 0 else None

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
