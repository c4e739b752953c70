"""torch.compile of a CE-LoRA model (docs/design.md §4, "torch.compile"): every scheduled module's
forward is an explicit graph boundary, so the schedule advances, the selection changes after each
refresh and nothing is recompiled per step, and the compiled model trains as the eager one does.

Times on the shared 2-core CPU (OMP_NUM_THREADS=1): the aot_eager tests 10-20 s each (mostly
Dynamo tracing), the inductor test 45-75 s cold (C++ compilation of the graphs), ~25 s with
inductor's on-disk cache warm.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from celora_dist import CELoRAConfig, inject_celora, on_optimizer_step, telemetry
from celora_dist.head import VocabSparseLMHead
from celora_dist.layer import CELoRALinear, celora_layers
from celora_dist.parallel.layers import ColumnParallelCELoRALinear, RowParallelCELoRALinear
from celora_dist.scheduled import GRAPH_BOUNDARY_REASON, ScheduledModule

from .conftest import tiny_llama

STEPS = 6
REFRESH = 2  # refresh steps 0, 2, 4; approximate steps 1, 3, 5


def _all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _all_subclasses(sub)
    return found


def test_every_scheduled_module_forward_is_a_graph_boundary():
    """Each scheduled module class (and any subclass that overrides forward) carries the boundary,
    and Dynamo really compiles nothing of it: a compiled layer or head alone has no frame."""
    classes = _all_subclasses(ScheduledModule)
    assert {CELoRALinear, VocabSparseLMHead, ColumnParallelCELoRALinear, RowParallelCELoRALinear} <= classes
    for cls in classes:
        assert getattr(cls.forward, "_torchdynamo_disable_msg", None) == GRAPH_BOUNDARY_REASON, cls.__name__

    torch.manual_seed(0)
    layer = CELoRALinear(torch.nn.Linear(32, 24), r=4, alpha=8, r0=4, keep=0.5)
    head = VocabSparseLMHead(torch.nn.Linear(32, 40, bias=False), keep=0.25)
    x = torch.randn(3, 32, requires_grad=True)
    for module, control in ((layer, torch.nn.Linear(32, 24)), (head, torch.nn.Linear(32, 40))):
        counted, plain = CompileCounterWithBackend("eager"), CompileCounterWithBackend("eager")
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(module, backend=counted)(x), module(x), rtol=0, atol=0)
        torch.compile(control, backend=plain)(x)
        assert counted.frame_count == 0 and plain.frame_count == 1  # the control shows the counter counts


def _twins(dropout: float = 0.0, **cfg):
    """The tiny Llama with CE-LoRA (approximate v/o/up/down, vocab-sparse head) and an eager copy."""
    model = tiny_llama().train()
    inject_celora(model, CELoRAConfig(r=4, alpha=8, r0=4, refresh_every=REFRESH, head_keep=0.3,
                                      dropout=dropout, **cfg), verbose=False)
    return model, copy.deepcopy(model)


def _train_both(compiled_model, eager_model, compiled, counter=None, steps: int = STEPS, autocast: bool = False):
    """``steps`` optimizer steps of each, on the same batches and dropout masks; per step the losses,
    the LoRA gradients, the schedule state after the step and the frames compiled so far."""
    records = []
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
            for m in (compiled_model, eager_model)]
    data = torch.Generator().manual_seed(0)
    for step in range(steps):
        ids = torch.randint(0, 128, (2, 24), generator=data)
        record = {"loss": [], "grads": [], "logits_dtype": []}
        for model, run, opt in ((compiled_model, compiled, opts[0]), (eager_model, eager_model, opts[1])):
            torch.manual_seed(100 + step)  # the same LoRA dropout masks in both
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                output = run(input_ids=ids, labels=ids)
            loss = output.loss
            loss.backward()
            record["logits_dtype"].append(output.logits.dtype)
            record["loss"].append(float(loss.detach()))
            record["grads"].append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            opt.step()
            opt.zero_grad(set_to_none=True)
            on_optimizer_step(model)
        record["state"] = [{name: (layer.step, None if layer.selected is None else layer.selected.clone())
                            for name, layer in celora_layers(m)} for m in (compiled_model, eager_model)]
        record["frames"] = None if counter is None else counter.frame_count
        records.append(record)
    return records


def _assert_schedule_moved(records) -> None:
    """Under compile the counters advance every step and the selection changes after a refresh."""
    for step, record in enumerate(records):
        for state in record["state"]:
            assert all(s == step + 1 for s, _ in state.values()), step
    approx = [name for name, (_, sel) in records[0]["state"][0].items() if sel is not None]
    assert approx, "no layer selected indices after the first refresh step"
    # indices chosen after refresh 0 (in use on step 1) vs after refresh 2 (in use on step 3)
    changed = [n for n in approx if not torch.equal(records[0]["state"][0][n][1], records[2]["state"][0][n][1])]
    assert changed, "the refresh on step 2 chose the same indices in every layer: selection frozen?"


def _compiled(model, backend: str):
    counter = CompileCounterWithBackend(backend)
    torch._dynamo.reset()
    return torch.compile(model, backend=counter), counter


def test_compiled_matches_eager_over_refresh_and_approximate_steps():
    """aot_eager (Dynamo + AOTAutograd, no codegen): same losses, gradients, indices and telemetry as
    eager over 3 refresh and 3 approximate steps, with LoRA dropout; no frame compiled after step 1."""
    model, eager = _twins(dropout=0.1)
    compiled, counter = _compiled(model, "aot_eager")
    records = _train_both(model, eager, compiled, counter)
    for step, record in enumerate(records):
        torch.testing.assert_close(record["loss"][0], record["loss"][1], rtol=1e-6, atol=1e-6)
        got, want = record["grads"]
        assert got.keys() == want.keys() and any("lora_A" in n for n in got)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{step} {name}: {m}")
        c_state, e_state = record["state"]
        for name, (s, sel) in e_state.items():
            assert c_state[name][0] == s
            assert (sel is None and c_state[name][1] is None) or torch.equal(c_state[name][1], sel), (step, name)
    _assert_schedule_moved(records)
    t_c, t_e = telemetry(model), telemetry(eager)
    assert t_c.keys() == t_e.keys() and any(v["kind"] == "lm_head" for v in t_c.values())
    for name in t_e:  # (the first block's v_proj never measures: its input needs no gradient)
        assert t_c[name]["step"] == t_e[name]["step"]
        if t_e[name]["step"] is not None:
            assert t_c[name]["rel_error"] == pytest.approx(t_e[name]["rel_error"], rel=1e-4)
    assert sum(t["step"] == 4 for t in t_c.values()) >= 4  # v/o/up/down of the last block at least
    frames = [r["frames"] for r in records]
    assert frames[0] > 0 and frames == [frames[0]] * STEPS, frames  # no recompilation per step


def test_backend_measurement_runs_under_compile(monkeypatch):
    """CELORA_KERNEL=auto: the measuring step (the first approximate one) times the candidates
    in the eager backward and the choice is made, still with no recompilation."""
    monkeypatch.setenv("CELORA_KERNEL", "auto")
    model, eager = _twins()
    compiled, counter = _compiled(model, "aot_eager")
    records = _train_both(model, eager, compiled, counter, steps=3)
    # layers that run a backward (not the first block's v_proj: its input needs no gradient)
    ran = {name: t for name, t in telemetry(model).items() if t["kind"] == "linear" and t["step"] is not None}
    assert len(ran) >= 4 and all(t["dx_backend"] in ("exact", "torch") for t in ran.values()), ran
    assert all(t["dx_backend_at"] == 1 and len(t["dx_backend_ms"]) == 2 for t in ran.values())
    assert len({r["frames"] for r in records}) == 1


def test_inductor_matches_eager():
    """Inductor's generated C++ (CPU): losses and LoRA gradients match eager within float32
    reassociation noise over refresh, approximate, refresh steps."""
    model, eager = _twins()
    torch._dynamo.reset()
    records = _train_both(model, eager, torch.compile(model, backend="inductor"), steps=3)
    for step, record in enumerate(records):
        torch.testing.assert_close(record["loss"][0], record["loss"][1], rtol=1e-5, atol=1e-5)
        got, want = record["grads"]
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{step} {name}: {m}")
        c_state, e_state = record["state"]
        assert all(c_state[n][0] == e_state[n][0] for n in e_state)
        assert all((e is None) == (c is None) and (e is None or torch.equal(c, e))
                   for n in e_state for c, e in [(c_state[n][1], e_state[n][1])])


def test_compiled_matches_eager_under_autocast():
    """torch.autocast("cpu", bfloat16) around both: the compiled model's losses and gradients are
    the eager model's within bf16 rounding, and the schedule moves as in fp32."""
    model, eager = _twins()
    compiled, counter = _compiled(model, "aot_eager")
    records = _train_both(model, eager, compiled, counter, autocast=True)
    for step, record in enumerate(records):
        assert record["logits_dtype"] == [torch.bfloat16] * 2  # autocast really on, in both
        torch.testing.assert_close(record["loss"][0], record["loss"][1], rtol=1e-2, atol=1e-2)
        got, want = record["grads"]
        for name in want:
            assert got[name].dtype == want[name].dtype == torch.float32  # fp32 master weights
            torch.testing.assert_close(got[name], want[name], rtol=2e-2, atol=2e-3, msg=lambda m: f"{step} {name}: {m}")
    _assert_schedule_moved(records)
    frames = [r["frames"] for r in records]
    assert frames == [frames[0]] * STEPS, frames
