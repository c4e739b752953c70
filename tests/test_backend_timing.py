"""Backend timing that means something on a GPU (celora_dist/kernels/choice.py, docs/design.md §3).

- ``event_median_times`` (CUDA): driven here by scripted events without a GPU: one warm-up per
  run, interleaved rounds, N back-to-back calls between two events, one synchronize, medians.
- Ranks agree without synced indices: two real gloo ranks with ``sync_indices=False`` and
  clocks that make their local medians disagree choose the same backend from the summed slot.
- The head's top-k without host syncs: the sync-free form against the host form and an
  independent reference, ties included.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from celora_dist import on_optimizer_step
from celora_dist.kernels import BACKENDS, choice, event_median_times, pick_backend
from celora_dist.layer import CELoRALinear
from celora_dist.ops import amm
from celora_dist.selection import topk_indices

from .conftest import decaying_weight
from .test_backend_choice import FakeClock
from .test_tp import _spawn

M, N, T = 48, 40, 24


# ---------------------------------------------------------------------- CUDA events, scripted
class ScriptedEvents:
    """Stand-ins for ``torch.cuda.Event``: ``record()`` stamps the device time, which moves only
    when a run is called (by its scripted seconds); ``elapsed_time`` is in milliseconds, as CUDA's.
    Timestamps are readable only after ``synchronize()`` — as on a GPU, where reading them
    earlier would need a sync per sample."""

    def __init__(self, costs: dict[str, list[float]]) -> None:
        self.now, self.costs, self.synced, self.order = 0.0, {k: iter(v) for k, v in costs.items()}, False, []

    def run(self, name: str):
        def call():
            self.order.append(name)
            self.now += next(self.costs[name])
        return call

    def event(self):
        script = self

        class Event:
            def record(self):
                self.stamp = script.now

            def elapsed_time(self, end):
                assert script.synced, "event read before synchronize"
                return (end.stamp - self.stamp) * 1e3
        return Event()

    def synchronize(self):
        self.synced = True


def test_event_median_times_times_back_to_back_calls_per_round():
    calls = 3
    # per run: warm-up, then 3 rounds of 3 calls; "a" has one slow round (an outlier), "b" a slow warm-up
    events = ScriptedEvents({"a": [9.0] + [1.0] * 3 + [50.0] * 3 + [2.0] * 3,
                             "b": [99.0] + [4.0] * 3 + [5.0] * 3 + [6.0] * 3})
    times = event_median_times({"a": events.run("a"), "b": events.run("b")}, repeats=3, calls=calls,
                               event=events.event, synchronize=events.synchronize)
    assert times == pytest.approx({"a": 2.0, "b": 5.0})  # seconds per call, medians of the rounds
    assert events.order == ["a", "b"] + (["a"] * calls + ["b"] * calls) * 3  # warm-up, interleaved rounds


def test_measure_uses_events_on_cuda_and_the_clock_elsewhere(monkeypatch):
    used = []
    monkeypatch.setattr(choice, "event_median_times", lambda runs: used.append("events") or
                        {name: 1.0 for name in runs})
    bc = choice.BackendChoice(clock=FakeClock(0, 0))
    runs = {"exact": lambda: None, "torch": lambda: None}
    bc.measure(runs, torch.device("cpu"))
    assert used == [] and bc.clock.reads == 2 * 2 * choice.REPEATS
    bc.reset()
    monkeypatch.setattr(bc, "record", lambda times, device: used.append(device.type))
    bc.measure(runs, torch.device("cuda"))  # no tensor is made on the device: runs nothing there
    assert used == ["events", "cuda"]


# ---------------------------------------------------------------------- unsynced indices
def _layer(seed: int = 0, **kw) -> CELoRALinear:
    torch.manual_seed(seed)
    base = torch.nn.Linear(N, M)
    with torch.no_grad():
        base.weight.copy_(decaying_weight(M, N, seed=seed))
    layer = CELoRALinear(base, r=4, r0=3, keep=0.5, refresh_every=4, **kw)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def _backward(layers, x, grad):
    for layer in layers:
        x_ = x.clone().requires_grad_(True)
        layer(x_).backward(grad)


def _timed_reference(clock: FakeClock):
    real = amm.celora_grad_input

    def timed(G, W, selected=None, left=None, right=None):
        clock.now += clock.cost["exact" if selected is None else "approx"]
        return real(G, W, selected, left, right)
    return timed


def test_unsynced_layer_measures_only_on_its_measuring_step(monkeypatch):
    monkeypatch.setenv("CELORA_KERNEL", "auto")
    clock = FakeClock(10.0, 4.0)
    monkeypatch.setattr(amm, "celora_grad_input", _timed_reference(clock))
    layer = _layer(sync_indices=False)
    layer.dx_choice.clock = clock
    layer.set_selected(torch.arange(0, M, 2))
    layer.step = 2  # approximate, but not the step after a refresh: no measurement
    x, grad = torch.randn(T, N), torch.randn(T, M)
    _backward([layer], x, grad)
    assert clock.reads == 0 and layer.pending_statistics() is None
    on_optimizer_step(layer)
    layer.step = 5  # 5 % refresh_every == 1: the measuring step, and its fixed-size slot
    _backward([layer], x, grad)
    slot = layer.pending_statistics()
    assert clock.reads > 0 and slot.tolist()[:2] == [10.0, 4.0] and math.isnan(slot[2]) and slot[3] == 1
    on_optimizer_step(layer)
    assert layer.dx_choice.chosen == "torch"
    assert layer.pending_statistics() is None  # step 6


# rank 0 alone would pick the approximation (4 vs 10), rank 1 alone exact (17 vs 10);
# summed, exact wins (20 vs 21) on both. Layer "b" is measured by rank 0 only (rank 1
# restored a choice for its k): both ranks take rank 0's medians (4 vs 10: the approximation).
RANK_COSTS = {0: (10.0, 4.0), 1: (10.0, 17.0)}


def _unsynced_worker(rank: int, port: int, out_dir: str) -> None:
    import os

    os.environ["CELORA_KERNEL"] = "auto"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        clock = FakeClock(*RANK_COSTS[rank])
        amm.celora_grad_input = _timed_reference(clock)
        model = torch.nn.ModuleDict({"a": _layer(0, sync_indices=False), "b": _layer(1, sync_indices=False)})
        for layer in model.values():
            layer.dx_choice.clock = clock
        g = torch.Generator().manual_seed(10 + rank)  # each rank its own micro-batch: its own indices
        x, grad = torch.randn(T, N, generator=g), torch.randn(T, M, generator=g)
        _backward(model.values(), x, grad)
        on_optimizer_step(model)  # refresh: nothing synced (each rank selects from its own scores)
        if rank == 1:
            model["b"].dx_choice.load_state({"k": model["b"].k, "backend": "exact"})
        _backward(model.values(), x, grad)  # step 1: the measuring step
        local = {name: layer.pending_statistics().tolist() for name, layer in model.items()}
        on_optimizer_step(model)
        torch.save({"chosen": {n: layer.dx_choice.chosen for n, layer in model.items()},
                    "times": {n: layer.dx_choice.times for n, layer in model.items()},
                    "selected": model["a"].selected, "local": local}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_without_synced_indices_agree_on_the_backend(tmp_path):
    _spawn(_unsynced_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.equal(r0["selected"], r1["selected"])  # indices really unsynced
    assert r0["local"]["a"][:2] == [10.0, 4.0] and r1["local"]["a"][:2] == [10.0, 17.0]  # they disagree
    assert pick_backend({"exact": 10.0, "torch": 4.0}) == "torch"  # rank 0 alone would approximate
    assert r0["chosen"] == r1["chosen"] == {"a": "exact", "b": "torch"}
    assert r0["times"] == r1["times"] == {"a": {"exact": 20.0, "torch": 21.0}, "b": {"exact": 10.0, "torch": 4.0}}
    assert r1["local"]["b"] == [0.0] * (len(BACKENDS) + 1)  # rank 1 did not measure "b": an empty slot


# ---------------------------------------------------------------------- top-k without host syncs
def _reference_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Independent: order by (score descending, index ascending) in Python, first k, ascending."""
    values = scores.tolist()
    return torch.tensor(sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]))


@pytest.mark.parametrize("n, levels", [(97, 5), (200, 3), (64, 64), (50, 1)])
def test_sync_free_topk_equals_the_host_form_with_ties(n, levels):
    g = torch.Generator().manual_seed(n)
    scores = torch.randint(0, levels, (n,), generator=g).float()  # few distinct values: many ties
    for k in (1, 2, n // 3, n // 2, n - 1, n):
        host, free = topk_indices(scores, k, sync_free=False), topk_indices(scores, k, sync_free=True)
        assert torch.equal(free, host) and torch.equal(free, _reference_topk(scores, k)), k


def test_sync_free_topk_never_reads_back_to_the_host(monkeypatch):
    scores = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(0)).float()
    expected = topk_indices(scores, 70, sync_free=False)

    def host_read(*args, **kwargs):
        raise AssertionError("a host read (device sync) in the sync-free top-k")

    for name in ("nonzero", "item", "tolist", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    got = topk_indices(scores, 70, sync_free=True)
    with pytest.raises(AssertionError, match="host read"):  # the patch does catch the host form's reads
        topk_indices(scores, 70, sync_free=False)
    monkeypatch.undo()
    assert torch.equal(got, expected)
    assert topk_indices(scores.double(), 70).device.type == "cpu"  # CPU keeps the host form by default
