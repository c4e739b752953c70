"""A GPU path that cannot crash (celora_dist/kernels/fallback.py, docs/design.md §3 "Kernel failures").

Failing Triton kernels are injected in real processes (tests/kernel_fault_worker.py), on one
rank and on two gloo ranks: at launch (Triton's real "no active driver" error: compiled kernels
called on CPU tensors without the interpreter) and at compile (the kernels' ``run``, what
``kernel[grid](...)`` calls to compile, raising ptxas / out-of-resources errors under the
interpreter). Each run is checked against a twin model on the torch path in the same process:
the steps complete, the gradients match within fp32 summation order (the healthy rank's
interpreter results differ from torch only there; a wrong fallback is off by O(1)), every
process warns exactly once per op, and every rank ends with Triton dropped.
The in-process tests below check the guard itself with a patched Triton function.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from celora_dist.kernels import KernelFallbackWarning, choice, dispatch, fallback
from celora_dist.ops import amm

from .train_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "kernel_fault_worker.py"
TIMEOUT_S = 120
# fp32, relative to the tensor's max magnitude: summation order only (Triton's interpreter
# against torch on the healthy rank; 0 on a rank that fell back, which runs the reference itself)
TOL = 1e-5


def _launch(tmp_path: Path, ranks: list[dict[str, str]], **common: str) -> list[dict]:
    """Start one worker process per entry of ``ranks`` (its own env additions), wait (hard
    timeout: a hang fails, never blocks the suite), return each rank's JSON report."""
    port = str(free_port())
    procs = []
    for rank, extra in enumerate(ranks):
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CELORA_KERNEL")}
        env.update(OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(len(ranks)), MASTER_PORT=port,
                   OUT=str(tmp_path / f"rank{rank}.json"), TRITON_CACHE_DIR=str(tmp_path / f"cache{rank}"),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   **common, **extra)
        procs.append(subprocess.Popen([sys.executable, str(WORKER)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        raise AssertionError(f"a worker did not finish within {TIMEOUT_S}s (a hang)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(len(ranks))]


def _assert_matches_torch(report: dict) -> None:
    for step, entry in enumerate(report["steps"]):
        for name, err in entry["err"].items():
            assert err <= TOL, f"step {step}: {name} off the torch reference by {err:.2e}"
    assert all(entry["same_selection"] for entry in report["steps"])  # the approximation really ran


def _one_warning_per_op(report: dict, own: set[str]) -> None:
    """Exactly one fallback warning per op; for ops that failed here it names the cause and the
    fallback, for the others that another rank failed."""
    for op in fallback.OPS:
        mine = [w for w in report["warnings"] if f"Triton {op} kernel" in w]
        assert len(mine) == 1, report["warnings"]
        if op in own:
            assert "running the torch path" in mine[0] and "another rank" not in mine[0].split(";")[0]
        else:
            assert "failed on another rank" in mine[0]


def _dropped_everywhere(report: dict) -> None:
    last = report["steps"][-1]
    assert all(last["failed"].values()) and all(last["agreed"].values())


# --------------------------------------------------------------------- real processes
def test_launch_failure_one_rank_falls_back_once(tmp_path):
    """CELORA_KERNEL=triton, compiled kernels on CPU tensors: each launch raises for real.
    The refresh step's score kernel and the approximate steps' dX (the layer's forced
    ``implementation(backend)`` and its default ``grad_input`` call) run torch instead."""
    (report,) = _launch(tmp_path, [{}], FAULT="launch", MODE="triton")
    _assert_matches_torch(report)
    assert len(report["warnings"]) == 2
    # the cause is whatever the launch on a CPU tensor raised first: Triton's "0 active drivers",
    # or the kernel's device query ("Torch not compiled with CUDA enabled" on a CPU build of torch,
    # a driver error on a CUDA build without a GPU); the warning must name its type and message
    for op in ("scores", "grad_input"):
        (warning,) = [w for w in report["warnings"] if f"Triton {op} kernel" in w]
        assert re.search(r"failed \((RuntimeError|AssertionError|\w+Error): .+\)", warning), warning
        assert f"running the torch path for {op} from now on" in warning
    assert report["steps"][0]["failed"] == {"grad_input": False, "scores": True}  # refresh: scores only
    assert report["steps"][1]["failed"] == {"grad_input": True, "scores": True}
    assert report["steps"][1]["agreed"] == {"grad_input": True, "scores": True}  # one process: known at once


def test_compile_failure_during_auto_measurement_marks_triton_unavailable(tmp_path):
    """CELORA_KERNEL=auto with Triton among the timed candidates: its compile fails inside the
    measurement; the candidate is recorded as unavailable (never chosen) and marked failed."""
    (report,) = _launch(tmp_path, [{"TRITON_INTERPRET": "1"}], FAULT="compile", MODE="auto")
    _assert_matches_torch(report)
    (warning,) = report["warnings"]
    assert "Triton grad_input kernel failed (PTXASError: PTXAS error: ptxas fatal" in warning
    assert report["kernel_runs"] == {"grad_input": 1, "scores": 0}  # tried once, never again
    chosen = report["choice"]  # the worker's scripted clock: exact 10 s, torch and triton 1 s per call
    assert chosen["dx_backend"] == "torch" and chosen["dx_backend_at"] == 1
    assert chosen["dx_backend_ms"] == {"exact": 10000.0, "torch": 1000.0}  # Triton's time: NaN, dropped


def test_compile_failure_on_one_of_two_ranks_drops_triton_on_both(tmp_path):
    """Rank 0's kernels fail to compile (the vocab-sparse head's calls hit them first), rank 1's
    run: after the first optimizer step both run torch, each warned once per op."""
    r0, r1 = _launch(tmp_path, [{"FAULT": "compile"}, {"FAULT": "none"}], MODE="triton", HEAD="1",
                     TRITON_INTERPRET="1")
    for report in (r0, r1):
        _assert_matches_torch(report)
        _dropped_everywhere(report)
        assert report["steps"][0]["agreed"] == {"grad_input": True, "scores": True}  # synced on step 0
    _one_warning_per_op(r0, own={"grad_input", "scores"})
    _one_warning_per_op(r1, own=set())
    assert r0["kernel_runs"] == {"grad_input": 1, "scores": 1}
    assert "OutOfResources: out of resource: shared memory" in next(w for w in r0["warnings"] if "scores" in w)


def test_launch_failure_on_one_rank_with_a_data_parallel_group_of_one(tmp_path):
    """Rank 0 launches compiled kernels on CPU tensors (fails for real), rank 1 runs the interpreter;
    each rank's data-parallel group is itself (a tensor-parallel grid), so the flags take their own
    world all-reduce. Both ranks drop each op at the step it failed on rank 0."""
    r0, r1 = _launch(tmp_path, [{"FAULT": "launch"}, {"FAULT": "none", "TRITON_INTERPRET": "1"}],
                     MODE="triton", GROUP="self")
    for report in (r0, r1):
        _assert_matches_torch(report)
        _dropped_everywhere(report)
        assert report["steps"][0]["failed"] == {"grad_input": False, "scores": True}
        assert report["steps"][1]["agreed"] == {"grad_input": True, "scores": True}
    _one_warning_per_op(r0, own={"grad_input", "scores"})
    _one_warning_per_op(r1, own=set())


# --------------------------------------------------------------------- the guard in-process
@pytest.fixture
def fresh(monkeypatch):
    """A process state with no failure yet, and a Triton dX that raises on every call."""
    monkeypatch.setattr(fallback, "_failed", {})
    monkeypatch.setattr(fallback, "_agreed", set())
    calls = []

    def broken(op):
        def run(*args, **kwargs):
            calls.append(op)
            raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")
        return run

    monkeypatch.setattr(dispatch, "_triton_function", broken)
    return calls


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(12, 20, generator=g), torch.randn(20, 9, generator=g), torch.arange(0, 20, 3),
            torch.randn(12, 4, generator=g), torch.randn(4, 9, generator=g))


def test_guard_returns_the_reference_and_warns_once(fresh):
    G, W, I, left, right = _problem()
    guarded = dispatch.implementation("triton")
    with pytest.warns(KernelFallbackWarning, match=r"grad_input kernel failed \(RuntimeError: Failed to find C "
                                                   r"compiler.*running the torch path for grad_input from now on"):
        out = guarded(G, W, I, left, right)
    assert torch.equal(out, amm.celora_grad_input(G, W, I, left, right))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        again = guarded(G, W, I, left, right)
        scores = dispatch.implementation("triton", "scores")  # another op: its own state
    assert torch.equal(again, out) and fresh == ["grad_input"]  # not retried
    assert fallback.failed("grad_input") and not fallback.failed("scores") and not fallback.agreed("grad_input")
    with pytest.warns(KernelFallbackWarning, match="scores kernel failed"):
        torch.testing.assert_close(scores(G), amm.gradient_scores(G), rtol=0, atol=0)


def test_bad_input_raises_the_reference_error_and_keeps_triton(fresh):
    G, W, I, left, right = _problem()
    with pytest.raises(ValueError, match="do not chain"):
        dispatch.implementation("triton")(G, W.t(), I)
    assert not fallback.failed("grad_input")


def test_forced_triton_degrades_and_kernel_backend_reports_torch(fresh, monkeypatch):
    monkeypatch.setenv("CELORA_KERNEL", "triton")
    G, W, I, left, right = _problem()
    assert dispatch.kernel_backend("cpu") == "triton"
    with pytest.warns(KernelFallbackWarning):
        out = dispatch.grad_input(G, W, I, left, right)
    assert torch.equal(out, amm.celora_grad_input(G, W, I, left, right))
    assert dispatch.kernel_backend("cpu") == "torch" and dispatch.configured_backend("cpu") == "triton"
    assert dispatch.triton_may_run("cpu")
    monkeypatch.setenv("CELORA_KERNEL", "auto")
    assert dispatch.triton_may_run("cuda") and not dispatch.triton_may_run("cpu")  # no flag sync on CPU runs


def test_flags_sum_marks_other_ranks_failures_with_one_warning(fresh):
    assert fallback.flags().tolist() == [0.0, 0.0]
    with pytest.warns(KernelFallbackWarning, match="scores kernel failed on another rank"):
        fallback.load_flags(torch.tensor([0.0, 1.0]))
    assert fallback.failed("scores") and fallback.agreed("scores") and not fallback.failed("grad_input")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fallback.load_flags(torch.tensor([0.0, 2.0]))  # known already: no second warning
    assert fallback.flags().tolist() == [0.0, 1.0]


def test_measurement_records_a_failing_triton_candidate_as_nan(fresh, monkeypatch):
    """The layer's measured choice: a Triton run that fails is NaN in the synced vector (so
    never chosen on any rank); once every rank agrees it failed, a layer that had chosen
    Triton takes the next best of the same medians without measuring again."""
    monkeypatch.setattr(choice, "configured_backend", lambda device_type, op="grad_input": "triton")
    G, W, I, left, right = _problem()
    triton = dispatch.implementation("triton")
    bc = choice.BackendChoice(clock=iter(range(100)).__next__)
    assert bc.candidates("cpu") == ("exact", "torch", "triton")
    with pytest.warns(KernelFallbackWarning):
        bc.measure({"exact": lambda: None, "torch": lambda: None, "triton": lambda: triton(G, W, I, left, right)},
                   torch.device("cpu"))
    vector = bc.pending_statistics()
    assert vector[:2].tolist() == [1.0, 1.0] and math.isnan(vector[2])
    bc.decide(step=1)
    assert bc.chosen == "exact" and "triton" not in bc.times

    bc.chosen, bc.times = "triton", {"exact": 10.0, "torch": 6.0, "triton": 4.0}  # chosen before the failure
    assert not bc.wants_measurement("cpu") and bc.chosen == "triton"  # not agreed yet: unchanged
    fallback.agree_local()
    assert bc.candidates("cpu") == ("exact", "torch")
    assert not bc.wants_measurement("cpu") and bc.chosen == "torch"  # re-picked, not re-measured
