"""One process (one rank) of tests/test_kernel_fallback.py: CE-LoRA steps with a Triton kernel
that fails, against a twin model run on the torch path in the same process.

Run as a script, so the environment (TRITON_INTERPRET, CELORA_KERNEL, the rank) is set before
triton is first imported. ``FAULT`` says how Triton fails here:

- ``launch``: no interpreter, CPU tensors: Triton's real launch raises (no active driver);
- ``compile``: under the interpreter, the kernels' ``run`` (what ``kernel[grid](...)`` calls to
  compile and launch) is patched to raise ptxas / out-of-resources errors, as a GPU compile would;
- ``none``: the interpreter, working (the healthy rank).

``MODE=auto`` makes Triton a measured candidate on the CPU (the test patches the candidate list,
as a CUDA device would have it), so the failure happens inside the backend measurement. Writes
a JSON report to ``OUT``; every assertion runs in the parent test.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

FAULT, MODE, OUT = os.environ["FAULT"], os.environ["MODE"], os.environ["OUT"]
RANK, WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
HEAD = os.environ.get("HEAD", "0") == "1"
GROUP = os.environ.get("GROUP", "world")  # "self": a data-parallel group of one rank (TP-like grid)
STEPS = 5
T, N, M, V = 24, 40, 48, 96

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from celora_dist import on_optimizer_step  # noqa: E402
from celora_dist.head import VocabSparseLMHead  # noqa: E402
from celora_dist.kernels import KernelFallbackWarning, choice, fallback  # noqa: E402
from celora_dist.layer import CELoRALinear  # noqa: E402

kernel_runs = {"grad_input": 0, "scores": 0}  # Triton launches attempted per op (compile fault only)

if FAULT == "launch":
    # The dX kernel runs fp32 only with TF32 on (else the torch path, no launch to fail): what a
    # user with tf32=True has. It does not change CPU matmuls (the torch twin is unaffected).
    torch.backends.fp32_precision = "tf32"
if FAULT == "compile":
    from triton.runtime.errors import OutOfResources, PTXASError

    from celora_dist.kernels import amm_triton, scores_triton

    def _failing(op, exc):
        def run(*args, **kwargs):
            kernel_runs[op] += 1
            raise exc
        return run

    amm_triton._amm_kernel.run = _failing(
        "grad_input", PTXASError("ptxas fatal   : Unresolved extern function '__nv_fake'"))
    amm_triton._amm_kernel_tuned.run = amm_triton._amm_kernel.run
    scores_triton._colsq_kernel.run = _failing("scores", OutOfResources(262144, 232448, "shared memory"))
if MODE == "auto":  # Triton as a measured candidate on this CPU, as it is on CUDA
    choice.configured_backend = lambda device_type, op="grad_input": "triton"


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = CELoRALinear(nn.Linear(N, M), r=4, r0=3, keep=0.5, refresh_every=3)
        with torch.no_grad():
            self.proj.lora_B.weight.normal_()  # LoRA's dX term non-zero
        self.head = VocabSparseLMHead(nn.Linear(M, V, bias=False), keep=0.25) if HEAD else None

    def forward(self, x):
        y = self.proj(x)
        return self.head(y) if self.head is not None else y


def scripted_clock(durations=(10.0, 1.0, 1.0)):
    """A host clock for the measurement that says: exact 10 s, torch 1 s, triton 1 s per call (reads
    come in (start, end) pairs, one per candidate in the order exact, torch, triton), so the choice
    is torch, the path the twin runs, whatever this loaded machine's real timings are."""
    state = {"now": 0.0, "reads": 0}

    def clock() -> float:
        if state["reads"] % 2 == 1:
            state["now"] += durations[(state["reads"] // 2) % len(durations)]
        state["reads"] += 1
        return state["now"]
    return clock


def grads(model: Tiny, x: torch.Tensor, g: torch.Tensor, setting: str) -> dict[str, torch.Tensor]:
    os.environ["CELORA_KERNEL"] = setting
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    model(x).backward(g)
    return {"dX": x.grad, "dA": model.proj.lora_A.weight.grad, "dB": model.proj.lora_B.weight.grad}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    group = None
    if WORLD > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
                                rank=RANK, world_size=WORLD, timeout=timedelta(seconds=60))
        if GROUP == "self":
            singles = [dist.new_group([r]) for r in range(WORLD)]
            group = singles[RANK]
    setting = "auto" if MODE == "auto" else "triton"
    model, twin = Tiny(), Tiny()
    if MODE == "auto":
        model.proj.dx_choice.clock = scripted_clock()
    report = {"steps": [], "warnings": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            gen = torch.Generator().manual_seed(100 * RANK + step)  # each rank its own batch
            x, g = torch.randn(T, N, generator=gen), torch.randn(T, V if HEAD else M, generator=gen)
            ref = grads(twin, x, g, "torch")
            out = grads(model, x, g, setting)
            os.environ["CELORA_KERNEL"] = "torch"
            on_optimizer_step(twin, group)
            os.environ["CELORA_KERNEL"] = setting
            on_optimizer_step(model, group)
            report["steps"].append({
                "err": {name: rel_err(out[name], ref[name]) for name in ref},
                "same_selection": bool(model.proj.selected is not None
                                       and torch.equal(model.proj.selected, twin.proj.selected)),
                "failed": {op: fallback.failed(op) for op in fallback.OPS},
                "agreed": {op: fallback.agreed(op) for op in fallback.OPS},
            })
    report["warnings"] = [str(w.message) for w in caught if issubclass(w.category, KernelFallbackWarning)]
    report["kernel_runs"] = kernel_runs
    report["choice"] = model.proj.dx_choice.telemetry()
    if WORLD > 1:
        dist.barrier()
        dist.destroy_process_group()
    with open(OUT, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
