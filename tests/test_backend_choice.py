"""Measured dX backend choice (celora_dist/kernels/choice.py, docs/design.md §3 "Never slower").

Times come from an injected clock, never from the wall clock: each test scripts what the
exact and the approximate dX "cost", and checks what the layer then runs — the approximate
product when it is faster, the dense LoRA dX when it is not — against hand-computed
gradients; two real gloo processes check that ranks with different timings agree.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from celora_dist import on_optimizer_step, telemetry
from celora_dist.kernels import BACKENDS, BackendChoice, median_times, pick_backend
from celora_dist.layer import CELoRALinear
from celora_dist.ops import amm

from .conftest import decaying_weight
from .test_tp import _spawn

M, N, T = 48, 40, 24

def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 summation-order tolerance, relative to the gradient's largest entry (measured
    worst 2.3e-7 of it between G (W0 + s B A) and G W0 + s (G B) A); a wrong backend is
    off by the approximation error, O(10%)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * float(expected.detach().abs().max()))


class FakeClock:
    """A clock that only moves when a dX implementation runs: by the scripted cost of the
    exact (``selected is None``) or the approximate product."""

    def __init__(self, exact: float, approx: float) -> None:
        self.now, self.cost = 0.0, {"exact": exact, "approx": approx}
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


@pytest.fixture
def auto(monkeypatch):
    monkeypatch.setenv("CELORA_KERNEL", "auto")


def _clocked(monkeypatch, clock: FakeClock) -> None:
    """Make every reference dX call advance ``clock`` by its scripted cost (results unchanged)."""
    real = amm.celora_grad_input

    def timed(G, W, selected=None, left=None, right=None):
        clock.now += clock.cost["exact" if selected is None else "approx"]
        return real(G, W, selected, left, right)

    monkeypatch.setattr(amm, "celora_grad_input", timed)


def _layer(seed: int = 0, keep: float | str = 0.5) -> CELoRALinear:
    torch.manual_seed(seed)
    base = torch.nn.Linear(N, M)
    with torch.no_grad():
        base.weight.copy_(decaying_weight(M, N, seed=seed))
    layer = CELoRALinear(base, r=4, r0=3, keep=keep, refresh_every=100)
    with torch.no_grad():
        layer.lora_B.weight.normal_()  # non-zero, so LoRA's dX term is checked too
    return layer


def _dx(layer: CELoRALinear, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    layer(x).backward(grad)
    return x.grad


def _exact_dx(layer: CELoRALinear, grad: torch.Tensor) -> torch.Tensor:
    """PEFT LoRA's activation gradient, by hand: G (W0 + s B A)."""
    W = layer.base_layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    return grad @ W


def _approx_dx(layer: CELoRALinear, grad: torch.Tensor) -> torch.Tensor:
    """The CE-LoRA estimate by hand: G[:, I] W0[I] + G[:, Ī] B0[Ī] A0 + s G B A."""
    I, Ibar = layer.selected, layer.complement
    return (grad[:, I] @ layer.base_layer.weight[I] + grad[:, Ibar] @ layer.B0[Ibar] @ layer.A0
            + layer.scaling * grad @ layer.lora_B.weight @ layer.lora_A.weight)


def _train_to_choice(layer: CELoRALinear, x: torch.Tensor, grad: torch.Tensor) -> None:
    """Refresh step 0 (exact, selects I), then the measuring step 1; the choice applies from step 2."""
    _dx(layer, x, grad)
    on_optimizer_step(layer)
    assert layer.dx_choice.chosen is None
    assert_same(_dx(layer, x, grad), _approx_dx(layer, grad))  # measuring step: approximate
    on_optimizer_step(layer)


# ---------------------------------------------------------------------- pure parts
def test_median_times_interleaves_and_takes_medians():
    clock = FakeClock(0, 0)
    order: list[str] = []
    script = {"a": iter([9.0, 1.0, 2.0, 3.0, 100.0, 4.0]), "b": iter([9.0, 7.0, 5.0, 6.0, 8.0, 0.5])}

    def run(name):
        def call():
            order.append(name)
            clock.now += next(script[name])
        return call

    times = median_times({"a": run("a"), "b": run("b")}, clock, repeats=5)
    assert times == {"a": 3.0, "b": 6.0}  # warm-up (9.0) dropped; the 100.0 outlier ignored
    assert order == ["a", "b"] * 6  # one warm-up each, then one call of each per round
    assert clock.reads == 2 * 2 * 5


@pytest.mark.parametrize("times, expected", [
    ({"exact": 10.0, "torch": 5.0}, "torch"),
    ({"exact": 10.0, "torch": 9.6}, "exact"),  # 4% faster: inside the 5% margin
    ({"exact": 10.0, "torch": 9.4}, "torch"),
    ({"exact": 10.0, "torch": 12.0}, "exact"),
    ({"exact": 10.0, "torch": 6.0, "triton": 4.0}, "triton"),
    ({"exact": 10.0, "torch": 6.0, "triton": math.nan}, "torch"),  # not run: never wins
    ({"exact": 10.0}, "exact"),
])
def test_pick_backend(times, expected):
    assert pick_backend(times) == expected


def test_choice_vector_is_fixed_order_and_nan_for_backends_not_run():
    choice = BackendChoice()
    choice.record({"torch": 2.0, "exact": 3.0})
    vec = choice.pending_statistics()
    assert BACKENDS == ("exact", "torch", "triton")
    assert vec[:2].tolist() == [3.0, 2.0] and math.isnan(vec[2])
    choice.decide(step=7)
    assert (choice.chosen, choice.chosen_at, choice.times) == ("torch", 7, {"exact": 3.0, "torch": 2.0})


# ---------------------------------------------------------------------- one layer
@pytest.mark.parametrize("exact_cost, approx_cost, expected", [(10.0, 4.0, "torch"), (10.0, 13.0, "exact"),
                                                                (10.0, 9.8, "exact")])
def test_layer_runs_what_the_clock_says_is_faster(auto, monkeypatch, exact_cost, approx_cost, expected):
    clock = FakeClock(exact_cost, approx_cost)
    _clocked(monkeypatch, clock)
    layer = _layer()
    layer.dx_choice.clock = clock
    g = torch.Generator().manual_seed(1)
    x, grad = torch.randn(T, N, generator=g), torch.randn(T, M, generator=g)
    _train_to_choice(layer, x, grad)

    assert layer.dx_choice.chosen == expected
    entry = telemetry(layer)[""]
    assert entry["dx_backend"] == expected and entry["dx_backend_at"] == 1
    assert entry["dx_backend_ms"] == pytest.approx({"exact": exact_cost * 1e3, "torch": approx_cost * 1e3}, rel=1e-6)
    reads = clock.reads
    dx = _dx(layer, x, grad)  # step 2 runs the choice, without measuring again
    assert clock.reads == reads
    reference = _approx_dx(layer, grad) if expected == "torch" else _exact_dx(layer, grad)
    assert_same(dx, reference)
    assert not torch.allclose(_approx_dx(layer, grad), _exact_dx(layer, grad), atol=1e-3)  # the two differ


def test_a_new_k_is_measured_again(auto, monkeypatch):
    clock = FakeClock(10.0, 4.0)
    _clocked(monkeypatch, clock)
    layer = _layer(keep="auto")
    layer.dx_choice.clock = clock
    layer.set_selected(torch.arange(0, M, 2))  # k = 24, as a refresh would install
    layer.step = 1  # an approximate step
    x, grad = torch.randn(T, N), torch.randn(T, M)
    _dx(layer, x, grad)
    on_optimizer_step(layer)
    assert layer.dx_choice.chosen == "torch"
    clock.cost["approx"] = 20.0
    layer.set_selected(torch.arange(0, 24))  # same k: the choice stands, no new measurement
    reads = clock.reads
    _dx(layer, x, grad)
    assert clock.reads == reads and layer.dx_choice.chosen == "torch"
    layer.set_selected(torch.arange(0, M, 3))  # k = 16: measured again, and now exact wins
    _dx(layer, x, grad)
    assert clock.reads > reads
    on_optimizer_step(layer)
    assert layer.dx_choice.chosen == "exact"


def test_celora_kernel_still_forces_the_approximation(monkeypatch):
    monkeypatch.setenv("CELORA_KERNEL", "torch")
    clock = FakeClock(1.0, 50.0)  # would choose exact, if anything were measured
    _clocked(monkeypatch, clock)
    layer = _layer()
    layer.dx_choice.clock = clock
    x, grad = torch.randn(T, N), torch.randn(T, M)
    _train_to_choice(layer, x, grad)
    assert_same(_dx(layer, x, grad), _approx_dx(layer, grad))
    assert clock.reads == 0 and layer.dx_choice.chosen is None
    monkeypatch.setenv("CELORA_KERNEL", "bogus")
    with pytest.raises(ValueError, match="CELORA_KERNEL"):
        _dx(layer, x, grad)


def test_checkpointed_choice_is_restored_and_dropped_on_another_device(auto, monkeypatch):
    clock = FakeClock(10.0, 13.0)
    _clocked(monkeypatch, clock)
    layer = _layer()
    layer.dx_choice.clock = clock
    x, grad = torch.randn(T, N), torch.randn(T, M)
    _train_to_choice(layer, x, grad)
    state = layer.schedule_state()
    assert state["dx_backend"] == {"k": layer.k, "backend": "exact"}

    twin = _layer()
    twin.load_state_dict(layer.state_dict())
    twin.load_schedule_state(state)
    twin.dx_choice.clock = clock
    reads = clock.reads
    assert_same(_dx(twin, x, grad), _exact_dx(layer, grad))
    assert clock.reads == reads  # restored, not re-measured

    state["dx_backend"] = {"k": layer.k, "backend": "triton"}  # chosen on a GPU, resumed on this CPU
    twin.load_schedule_state(state)
    _dx(twin, x, grad)
    assert clock.reads > reads and twin.dx_choice.chosen is None  # measured anew (pending)
    del state["dx_backend"]  # a checkpoint from before the measured choice
    twin.load_schedule_state(state)
    assert twin.dx_choice.chosen is None


# ---------------------------------------------------------------------- ranks agree
# rank 0 alone would pick the approximation (4 vs 10), rank 1 alone exact (17 vs 10);
# summed, exact wins (20 vs 21) on both.
RANK_COSTS = {0: (10.0, 4.0), 1: (10.0, 17.0)}


def _agree_worker(rank: int, port: int, out_dir: str) -> None:
    import os

    os.environ["CELORA_KERNEL"] = "auto"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        clock = FakeClock(*RANK_COSTS[rank])
        real = amm.celora_grad_input

        def timed(G, W, selected=None, left=None, right=None):
            clock.now += clock.cost["exact" if selected is None else "approx"]
            return real(G, W, selected, left, right)

        amm.celora_grad_input = timed
        layer = _layer()
        layer.dx_choice.clock = clock
        g = torch.Generator().manual_seed(10 + rank)  # each rank its own micro-batch
        x, grad = torch.randn(T, N, generator=g), torch.randn(T, M, generator=g)
        _dx(layer, x, grad)
        on_optimizer_step(layer)  # scores summed over both ranks: the same I
        _dx(layer, x, grad)
        local = dict(zip(BACKENDS, layer.dx_choice.pending_statistics().tolist()))
        on_optimizer_step(layer)
        dx = _dx(layer, x, grad)
        torch.save({"chosen": layer.dx_choice.chosen, "times": layer.dx_choice.times, "local": local,
                    "selected": layer.selected, "dx": dx, "exact": _exact_dx(layer, grad)},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_on_the_summed_timings(tmp_path):
    _spawn(_agree_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["local"]["torch"] == 4.0 and r1["local"]["torch"] == 17.0  # they measured differently
    assert pick_backend({"exact": 10.0, "torch": 4.0}) == "torch"  # rank 0 alone would approximate
    assert r0["chosen"] == r1["chosen"] == "exact"
    assert r0["times"] == r1["times"] == {"exact": 20.0, "torch": 21.0}
    assert torch.equal(r0["selected"], r1["selected"])
    for r in (r0, r1):  # and both then run the exact dX
        assert_same(r["dx"], r["exact"])
