"""Tensor-parallel CE-LoRA on 2 real gloo ranks against single-process references.

Each test spawns 2 processes (OMP_NUM_THREADS=1, a free TCP port, a hard timeout);
the workers only record tensors, every assertion runs here in the parent against
references computed without torch.distributed:

* layer level: dX/dA/dB/y of each TP layer vs the hand-written CE-LoRA formula
  (float64 SVD, Ws materialised), exact and approximate steps, with and without
  LoRA dropout; per-shard (column) and global (row) top-k selections; telemetry.
* model level: a tiny Llama at TP=2 vs the plain CE-LoRA model (TP=1) over 4 SGD
  steps with refresh_every=2 — losses and LoRA gradients gathered to PEFT shapes,
  in exact mode and in CE-LoRA mode (the TP=1 column layers get the union of the
  per-shard top-k, set explicitly), and with adaptive keep (no help: both runs must
  choose the same k and rows); the exported adapter loads in peft.

fp32 tolerance 1e-5 (relative to each tensor's max magnitude; 3e-5 for model
gradients after several SGD steps): only summation order differs between TP=2
and TP=1.
"""
from __future__ import annotations

import math
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from celora_dist import CELoRAConfig, inject_celora, on_optimizer_step, telemetry
from celora_dist.parallel import (ColumnParallelCELoRALinear, RowParallelCELoRALinear, check_tp_zero_stage,
                                  gather_lora_state_dict, parallelize_celora, save_tp_adapter, tp_layers)
from celora_dist.layer import celora_layers
from celora_dist.selection import topk_indices

from .conftest import decaying_weight, tiny_llama
from .train_utils import free_port

REPO = str(Path(__file__).resolve().parents[1])
WORLD = 2
TIMEOUT_S = 150
TOL = 1e-5
# Model level, 4 SGD steps: fp32 summation-order noise through 2 decoder layers, relative
# to each gradient's max; measured worst 1.5e-5 (exact mode, step 3), 1.4e-6 at step 0.
# A mis-reduced or mis-sharded LoRA gradient is off by O(1).
MODEL_TOL = 3e-5
ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- launch
def _spawn(fn, *args, nprocs: int = WORLD) -> None:
    """Run ``fn(rank, port, *args)`` on ``nprocs`` spawned ranks; re-raise failures, kill on timeout."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, saved["PYTHONPATH"]) if p)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        ctx = mp.start_processes(fn, args=(free_port(), *args), nprocs=nprocs, join=False,
                                 start_method="spawn")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} did not finish within {TIMEOUT_S}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _init(rank: int, port: int, world: int = WORLD, tp: int = WORLD):
    """A TP x DP grid: TP groups of consecutive ranks, DP groups of equal TP rank."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    tp_groups = [dist.new_group(list(range(d * tp, (d + 1) * tp))) for d in range(world // tp)]
    dp_groups = [dist.new_group(list(range(t, world, tp))) for t in range(tp)]
    return tp_groups[rank // tp], dp_groups[rank % tp]


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL, what: str = "") -> None:
    """assert_close relative to the expected tensor's largest magnitude."""
    expected = expected.double()
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual.double() / scale, expected / scale, rtol=tol, atol=tol,
                               msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- layer level
T_SHAPE = (2, 5)
N_COL, M_COL = 40, 48  # column layer: n -> m (an up projection)
N_ROW, M_ROW = 48, 40  # row layer: n -> m (a down projection)
R, R0, ALPHA, KEEP, P_DROP, LAYER_STEPS = 4, 3, 8.0, 0.5, 0.3, 3


def _layer_case(m: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    case = {"W": decaying_weight(m, n, seed=seed), "b": torch.randn(m, generator=g),
            "A": torch.randn(R, n, generator=g) * 0.2, "B": torch.randn(m, R, generator=g) * 0.2}
    for step in range(LAYER_STEPS):  # a few dominant output features so top-k is well separated
        case[f"x{step}"] = torch.randn(*T_SHAPE, n, generator=g)
        case[f"G{step}"] = torch.randn(*T_SHAPE, m, generator=g) * (torch.rand(m, generator=g) + 0.1)
    return case


def _build_tp_layer(cls, case, tp_group, dropout: float):
    linear = nn.Linear(case["W"].shape[1], case["W"].shape[0])
    with torch.no_grad():
        linear.weight.copy_(case["W"])
        linear.bias.copy_(case["b"])
    layer = cls(linear, tp_group, r=R, alpha=ALPHA, rslora=True, r0=R0, keep=KEEP, dropout=dropout,
                refresh_every=2, name="proj")
    t, tp = layer.tp_rank, layer.tp_size
    with torch.no_grad():  # known full LoRA weights, sharded as the layer shards them
        if cls is ColumnParallelCELoRALinear:
            rows = case["B"].shape[0] // tp
            layer.lora_A.weight.copy_(case["A"])
            layer.lora_B.weight.copy_(case["B"][t * rows:(t + 1) * rows])
        else:
            cols = case["A"].shape[1] // tp
            layer.lora_A.weight.copy_(case["A"][:, t * cols:(t + 1) * cols])
            layer.lora_B.weight.copy_(case["B"])
    return layer.train()


def _layer_worker(rank: int, out_dir: str, tp_group, dp_group) -> None:
    with pytest.raises(ValueError, match="not divisible"):
        ColumnParallelCELoRALinear(nn.Linear(8, 7), tp_group, r=2, r0=1, keep=0.5)
    results = {}
    for dropout in (0.0, P_DROP):
        col_case, row_case = _layer_case(M_COL, N_COL, seed=1), _layer_case(M_ROW, N_ROW, seed=2)
        col = _build_tp_layer(ColumnParallelCELoRALinear, col_case, tp_group, dropout)
        row = _build_tp_layer(RowParallelCELoRALinear, row_case, tp_group, dropout)
        rec = {"col": [], "row": []}
        cols = N_ROW // WORLD
        for step in range(LAYER_STEPS):
            for key, layer, case in (("col", col, col_case), ("row", row, row_case)):
                x = case[f"x{step}"]
                G = case[f"G{step}"]
                if key == "col":
                    rows = M_COL // WORLD
                    G = G[..., rank * rows:(rank + 1) * rows]  # this rank's output shard
                else:
                    x = x[..., rank * cols:(rank + 1) * cols]  # this rank's input shard
                x = x.clone().requires_grad_(True)
                torch.manual_seed(100 + step)  # same dropout mask on both ranks and in the reference
                y = layer(x)
                y.backward(G)
                A_grad, B_grad = layer.gather_lora(grads=True)
                layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
                on_optimizer_step(layer, dp_group)
                sel = layer.global_selected() if key == "col" else layer.selected
                rec[key].append({"y": y.detach(), "dX": x.grad, "dA": A_grad, "dB": B_grad,
                                 "selected": None if sel is None else sel.clone()})
        rec["col_err"], rec["row_err"] = col.error.last, row.error.last
        results[dropout] = rec
    torch.save(results, Path(out_dir) / f"layer_rank{rank}.pt")


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory) -> Path:
    """ONE 2-rank spawn for the whole file: each rank pays ~20 s of imports on shared cores."""
    out = tmp_path_factory.mktemp("tp")
    _spawn(_worker, str(out))
    return out


@pytest.fixture(scope="module")
def layer_runs(tp_runs):
    return [torch.load(tp_runs / f"layer_rank{r}.pt") for r in range(WORLD)]


def _ref_factors(W: torch.Tensor, r0: int):
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    root = S[:r0].sqrt()
    return U[:, :r0] * root, root[:, None] * Vh[:r0]


def _dropout_mask(shape, step: int, p: float) -> torch.Tensor:
    """The scaled keep-mask nn.Dropout draws after torch.manual_seed(100 + step)."""
    torch.manual_seed(100 + step)
    return F.dropout(torch.ones(shape), p, training=True).double() if p > 0 else torch.ones(shape).double()


def _layer_reference(case, kind: str, dropout: float):
    """Per step: y, dX, dA, dB, the selection made after it, and the refresh-step error."""
    W, b, A, B = (case[k].double() for k in ("W", "b", "A", "B"))
    m, n = W.shape
    s = ALPHA / math.sqrt(R)
    B0, A0 = _ref_factors(W, R0)
    Ws = W - B0 @ A0
    ws_sq = (Ws * Ws).sum(dim=1)
    selected, out, err = None, [], None
    for step in range(LAYER_STEPS):
        x = case[f"x{step}"].double().reshape(-1, n)
        G = case[f"G{step}"].double().reshape(-1, m)
        if kind == "col":
            mask = _dropout_mask(x.shape, step, dropout)
        else:  # each rank draws the same mask for its own column shard
            mask = _dropout_mask((x.shape[0], n // WORLD), step, dropout).repeat(1, WORLD)
        xd = x * mask
        y = x @ W.T + b + s * (xd @ A.T) @ B.T
        lora_dx = s * ((G @ B) @ A) * mask
        exact = G @ W
        refresh = step % 2 == 0
        if selected is not None:
            approx = G @ B0 @ A0 + G[:, selected] @ Ws[selected]
            if refresh:  # telemetry: LoRA term in both only when it is fused (no dropout)
                extra = lora_dx if dropout == 0 else 0
                err = float((approx - exact).norm() / (exact + extra).norm())
        dX = exact + lora_dx if (refresh or selected is None) else approx + lora_dx
        dA = s * (G @ B).T @ xd
        dB = s * G.T @ (xd @ A.T)
        if refresh:
            score = (G * G).sum(dim=0) * ws_sq
            if kind == "col":
                rows = m // WORLD
                k_local = math.ceil(KEEP * rows)
                selected = torch.cat([topk_indices(score[t * rows:(t + 1) * rows], k_local) + t * rows
                                      for t in range(WORLD)])
            else:
                selected = topk_indices(score, math.ceil(KEEP * m))
        out.append({"y": y, "dX": dX, "dA": dA, "dB": dB, "selected": selected.clone()})
    return out, err


@pytest.mark.parametrize("dropout", [0.0, P_DROP])
@pytest.mark.parametrize("kind", ["col", "row"])
def test_layer_matches_reference_formula(layer_runs, kind, dropout):
    case = _layer_case(M_COL, N_COL, seed=1) if kind == "col" else _layer_case(M_ROW, N_ROW, seed=2)
    ref, ref_err = _layer_reference(case, kind, dropout)
    ranks = [run[dropout][kind] for run in layer_runs]
    for step, expected in enumerate(ref):
        got = [r[step] for r in ranks]
        what = f"{kind} dropout={dropout} step {step}"
        if kind == "col":  # output and B sharded by rows; dX and dA all-reduced (full on each rank)
            y = torch.cat([g["y"] for g in got], dim=-1)
            dX_per_rank = [g["dX"] for g in got]
            union = torch.cat([g["selected"] for g in got]).sort().values
            assert torch.equal(union, expected["selected"]), what
        else:  # output replicated; dX and A sharded by input columns
            y = got[0]["y"]
            _close(got[1]["y"], y.double(), what=what + " y replicated")
            dX_per_rank = [torch.cat([g["dX"] for g in got], dim=-1)]
            assert torch.equal(got[0]["selected"], got[1]["selected"]), what
            assert torch.equal(got[0]["selected"], expected["selected"]), what
        _close(y.reshape(-1, y.shape[-1]), expected["y"], what=what + " y")
        for dX in dX_per_rank:
            _close(dX.reshape(expected["dX"].shape), expected["dX"], what=what + " dX")
        for g in got:  # gather_lora(grads=True) returns full shapes on every rank
            _close(g["dA"], expected["dA"], what=what + " dA")
            _close(g["dB"], expected["dB"], what=what + " dB")
    # step 1 really was approximate, and the refresh at step 2 measured that
    # approximation's error of the FULL layer on every rank
    assert ref_err > 1e-2
    for run in layer_runs:
        assert run[dropout][f"{kind}_err"] == pytest.approx(ref_err, rel=1e-4)


# ----------------------------------------------------------------------------- model level
MODEL_STEPS, LR = 4, 0.5
AUTO_BUDGET = 0.3  # adaptive keep: loose enough that most layers drop features


def _model_cfg(mode: str) -> CELoRAConfig:
    if mode == "exact":
        return CELoRAConfig(r=4, alpha=8, r0=4, keep={}, exact=ALL_PROJ, refresh_every=2)
    if mode == "auto":
        return CELoRAConfig(r=4, alpha=8, r0=4, keep={p: "auto" for p in ALL_PROJ}, exact=(), refresh_every=2,
                            error_budget=AUTO_BUDGET)
    return CELoRAConfig(r=4, alpha=8, r0=4, keep={p: 0.5 for p in ALL_PROJ}, exact=(), refresh_every=2)


def _build_model(mode: str):
    """Tiny Llama + CE-LoRA with non-zero, seeded LoRA weights, and a fixed batch."""
    model = inject_celora(tiny_llama(seed=0), _model_cfg(mode), verbose=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in celora_layers(model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    return model, ids


def _sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)


MODEL_MODES = ("exact", "celora", "auto")


def _model_worker(rank: int, out_dir: str, tp_group, dp_group) -> None:
    for mode in MODEL_MODES:
        model, ids = _build_model(mode)
        parallelize_celora(model, tp_group)
        opt = _sgd(model)
        rec = {"loss": [], "grads": [], "selected": [], "full_k": []}
        for _ in range(MODEL_STEPS):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            rec["loss"].append(loss.detach())
            rec["grads"].append(gather_lora_state_dict(model, grads=True))
            opt.step()
            opt.zero_grad(set_to_none=True)
            on_optimizer_step(model, dp_group)
            rec["full_k"].append({name: layer.full_k for name, layer in tp_layers(model)
                                  if layer.parallel_mode == "column"})
            rec["selected"].append({
                name: None if layer.selected is None else
                (layer.global_selected() if layer.parallel_mode == "column" else layer.selected).clone()
                for name, layer in tp_layers(model)})
        rec["telemetry"] = telemetry(model)
        rec["modes"] = {name: layer.parallel_mode for name, layer in tp_layers(model)}
        save_tp_adapter(model, Path(out_dir) / f"adapter_{mode}")
        with torch.no_grad():
            rec["logits"] = model(input_ids=ids).logits
        torch.save(rec, Path(out_dir) / f"model_{mode}_rank{rank}.pt")


AUTOCAST_STEPS = 3  # refresh, approximate, refresh (refresh_every=2)
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
# (dtype, autocast): fp32 weights under autocast, or half weights without it
HALF_CASES = [(str(d), True) for d in AUTOCAST_DTYPES] + [(str(d), False) for d in AUTOCAST_DTYPES]


def _half_model(dtype: torch.dtype, autocast: bool):
    model, ids = _build_model("celora")
    return (model if autocast else model.to(dtype)), ids


def _autocast_steps(model, ids, dtype, dp_group=None, autocast=True):
    """SGD steps with the forward under CPU autocast (or on half weights); per step the loss, the
    LoRA gradients of step 0 (gathered to PEFT shapes at TP=2), the logits dtype and whether the
    step approximated."""
    gather = dp_group is not None
    opt, rec = _sgd(model), {"loss": [], "approximate": [], "logits_dtype": None}
    some_layer = next(layer for _, layer in celora_layers(model) if not layer.is_exact)
    for step in range(AUTOCAST_STEPS):
        rec["approximate"].append(some_layer.selected is not None and not some_layer.refresh_due())
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        rec["loss"].append(out.loss.detach().float())
        rec["logits_dtype"] = out.logits.dtype
        if step == 0:
            rec["grads"] = (gather_lora_state_dict(model, grads=True) if gather else
                            {f"base_model.model.{n}.lora_{ab}.weight": getattr(l, f"lora_{ab}").weight.grad.clone()
                             for n, l in celora_layers(model) for ab in "AB"})
            rec["grad_dtypes"] = {str(p.grad.dtype) for p in model.parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
        on_optimizer_step(model, dp_group)
    return rec


def _autocast_worker(rank: int, out_dir: str, tp_group, dp_group) -> None:
    """The TP=2 model (column and row layers) trained under bf16 and fp16 autocast, and on bf16 and
    fp16 weights without autocast."""
    rec = {}
    for name, autocast in HALF_CASES:
        dtype = getattr(torch, name.split(".")[1])
        model, ids = _half_model(dtype, autocast)
        parallelize_celora(model, tp_group)
        rec[(name, autocast)] = _autocast_steps(model, ids, dtype, dp_group, autocast)
    torch.save(rec, Path(out_dir) / f"autocast_rank{rank}.pt")


def _config_path_worker(rank: int, out_dir: str, tp_group) -> None:
    """parallelize_celora(cfg=...) on plain linears vs inject_celora (TP=1), same RNG."""
    cfg = _model_cfg("celora")
    with pytest.raises(ValueError, match="neither column-parallel"):
        parallelize_celora(tiny_llama(seed=0), tp_group, cfg=CELoRAConfig(keep={}, exact=("lm_head",)))
    ref, model = tiny_llama(seed=0), tiny_llama(seed=0)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base_logits = ref(input_ids=ids).logits
    torch.manual_seed(7)  # LoRA A init draws from the global RNG in module order, on both paths
    inject_celora(ref, cfg, verbose=False)
    torch.manual_seed(7)
    parallelize_celora(model, tp_group, cfg=cfg)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ref_layers = dict(celora_layers(ref))
    ws = {}
    for name, layer in tp_layers(model):
        full = ref_layers[name].ws_row_sq
        if layer.parallel_mode == "column":
            full = full[layer.tp_rank * layer.out_features:(layer.tp_rank + 1) * layer.out_features]
        ws[name] = (layer.ws_row_sq, full)
    torch.save({"adapter": gather_lora_state_dict(model), "ref_adapter": gather_lora_state_dict(ref),
                "logits": logits, "base_logits": base_logits, "ws": ws,
                "config": model.celora_config.to_dict(), "trainable": [n for n, p in model.named_parameters()
                                                                       if p.requires_grad]},
               Path(out_dir) / f"config_path_rank{rank}.pt")


def _worker(rank: int, port: int, out_dir: str) -> None:
    tp_group, dp_group = _init(rank, port)
    _layer_worker(rank, out_dir, tp_group, dp_group)
    _model_worker(rank, out_dir, tp_group, dp_group)
    _autocast_worker(rank, out_dir, tp_group, dp_group)
    _config_path_worker(rank, out_dir, tp_group)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def model_runs(tp_runs):
    return tp_runs


@pytest.mark.parametrize("mode", MODEL_MODES)
def test_tp2_equals_tp1_losses_grads_and_selection(model_runs, mode):
    """auto: adaptive keep at TP=2 chooses what one process would (column layers: the
    union of the ranks' rows of a global top-k), so the runs stay equal."""
    ranks = [torch.load(model_runs / f"model_{mode}_rank{r}.pt") for r in range(WORLD)]
    assert set(ranks[0]["modes"].values()) == {"column", "row"}
    assert all(ranks[0]["modes"][n] == "row" for n in ranks[0]["modes"] if n.endswith(("o_proj", "down_proj")))

    model, ids = _build_model(mode)  # the TP=1 reference: the plain CE-LoRA model, this process
    opt = _sgd(model)
    layers = dict(celora_layers(model))
    counts: dict[str, list[int]] = {}  # auto: per-rank kept rows of column layers
    for step in range(MODEL_STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for run in ranks:
            _close(run["loss"][step], loss.detach(), what=f"{mode} step {step} loss")
        for name, layer in layers.items():
            for ab, param in (("A", layer.lora_A.weight), ("B", layer.lora_B.weight)):
                key = f"base_model.model.{name}.lora_{ab}.weight"
                for run in ranks:
                    _close(run["grads"][step][key], param.grad, tol=MODEL_TOL, what=f"{mode} step {step} {key}")
        pending = {n: l.pending_scores.clone() for n, l in layers.items() if l.pending_scores is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
        on_optimizer_step(model)
        assert bool(pending) == (mode != "exact" and step % 2 == 0)
        for name, colsq in pending.items():
            layer, what = layers[name], f"{mode} step {step} {name}"
            tp_sel = [run["selected"][step][name] for run in ranks]
            if mode == "auto":
                if layer.selected is None:  # k = m: every rank runs exact
                    assert tp_sel == [None, None], what
                elif ranks[0]["modes"][name] == "row":
                    assert torch.equal(tp_sel[0], tp_sel[1]) and torch.equal(tp_sel[0], layer.selected), what
                else:
                    # each rank's rows of the global top-k; a rank with none keeps its best row
                    rows, score = layer.out_features // WORLD, colsq * layer.ws_row_sq
                    expected = [layer.selected[(layer.selected >= t * rows) & (layer.selected < (t + 1) * rows)]
                                for t in range(WORLD)]
                    expected = [e if e.numel() else topk_indices(score[t * rows:(t + 1) * rows], 1) + t * rows
                                for t, e in enumerate(expected)]
                    got = [torch.arange(t * rows, (t + 1) * rows) if sel is None else sel  # None: all its rows
                           for t, sel in enumerate(tp_sel)]
                    assert all(torch.equal(g, e) for g, e in zip(got, expected)), what
                    counts[name] = [len(e) for e in expected]
                    assert all(run["full_k"][step][name] == sum(counts[name]) for run in ranks), what
                    layer.set_selected(torch.cat(expected))  # differs from the TP=1 choice only by that rule
                continue
            if ranks[0]["modes"][name] == "row":
                # both TP ranks hold the identical selection, the global top-k
                assert torch.equal(tp_sel[0], tp_sel[1]), what
                assert torch.equal(tp_sel[0], layer.selected), what
            else:
                # union of per-rank selections == per-shard top-k of this step's G
                rows = layer.out_features // WORLD
                score = colsq * layer.ws_row_sq
                expected = torch.cat([topk_indices(score[t * rows:(t + 1) * rows], math.ceil(0.5 * rows))
                                      + t * rows for t in range(WORLD)])
                assert torch.equal(torch.cat(tp_sel).sort().values, expected), what
                layer.set_selected(expected)  # the TP=1 reference uses the same indices
    if mode == "auto":  # adaptive keep really dropped features, unevenly over the column shards
        assert any(1 <= layer.k < layer.out_features for layer in layers.values())
        assert any(a != b for a, b in counts.values()), counts
    if mode != "exact":  # the approximation was really used, and measured alike
        ref_tel = telemetry(model)
        measured = {n for n, e in ref_tel.items() if e["rel_error"] is not None}
        if mode == "celora":
            # layer 0's q/k/v get no input gradient (frozen embeddings): no dX to measure
            assert len(measured) == len(ref_tel) - 3
        assert measured
        for run in ranks:
            for name, entry in ref_tel.items():
                got = run["telemetry"][name]["rel_error"]
                if name not in measured:
                    assert got is None, name
                    continue
                assert entry["rel_error"] > 1e-3, name
                assert got == pytest.approx(entry["rel_error"], rel=1e-3), name
    # after 4 steps of identical updates the live models still agree
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for run in ranks:
        _close(run["logits"], logits, tol=1e-4, what=f"{mode} logits")


# bf16 / fp16 against the TP=1 model under the same autocast on the exact first step: both
# round differently (sharded sums), so relative to each tensor's max magnitude, 3e-2 / 4e-3
# (8 and 4 units of the dtype's epsilon); a mis-cast or mis-reduced gradient is off by O(1).
AUTOCAST_TOL = {str(torch.bfloat16): 3e-2, str(torch.float16): 4e-3}


@pytest.mark.parametrize("dtype,autocast", HALF_CASES)
def test_tp2_trains_in_half_precision(model_runs, dtype, autocast):
    """Column and row TP layers under autocast (fp32 weights) or on half weights: logits in the
    half dtype, LoRA gradients in the weights' dtype, the exact first step equal to TP=1 in the
    same precision, then approximate steps, finite losses."""
    ranks = [torch.load(model_runs / f"autocast_rank{r}.pt")[(dtype, autocast)] for r in range(WORLD)]
    half = getattr(torch, dtype.split(".")[1])
    model, ids = _half_model(half, autocast)
    ref = _autocast_steps(model, ids, half, autocast=autocast)
    tol = AUTOCAST_TOL[dtype]
    for run in ranks:
        assert str(run["logits_dtype"]) == dtype
        assert run["grad_dtypes"] == {"torch.float32" if autocast else dtype}
        assert run["approximate"] == ref["approximate"] == [False, True, False]
        assert all(math.isfinite(float(v)) for v in run["loss"])
        _close(run["loss"][0], ref["loss"][0], tol=tol, what=f"{dtype} loss")
        for key, grad in ref["grads"].items():
            _close(run["grads"][key], grad, tol=tol, what=f"{dtype} {key}")


def test_tp_adapter_export_loads_in_peft(model_runs):
    """The gathered adapter of the TP run reproduces its logits in plain peft, one process."""
    from peft import PeftModel

    rank0 = torch.load(model_runs / "model_celora_rank0.pt")
    _, ids = _build_model("celora")
    peft_model = PeftModel.from_pretrained(tiny_llama(seed=0), str(model_runs / "adapter_celora"))
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    _close(logits, rank0["logits"], tol=1e-4, what="peft logits")


def test_parallelize_plain_linears_from_config(model_runs):
    """The cfg path factors each full W0 itself: same LoRA init as inject_celora, the
    per-shard (column) / all-reduced (row) residual norms of the full factorisation,
    and with B = 0 the TP model reproduces the base model."""
    for rank in range(WORLD):
        run = torch.load(model_runs / f"config_path_rank{rank}.pt")
        assert run["adapter"].keys() == run["ref_adapter"].keys()
        for key, value in run["ref_adapter"].items():
            assert torch.equal(run["adapter"][key], value), key
        _close(run["logits"], run["base_logits"], what="cfg path logits")
        assert len(run["ws"]) == 14
        for name, (got, expected) in run["ws"].items():
            _close(got, expected, what=f"ws_row_sq {name}")
        assert run["config"] == _model_cfg("celora").to_dict()
        assert run["trainable"] and all(".lora_" in n for n in run["trainable"])


# ----------------------------------------------------------------------------- TP x DP
def _grid_worker(rank: int, port: int, out_dir: str) -> None:
    """TP=2 x DP=2: each DP replica sees its own batch; scores sync over the DP group."""
    tp_group, dp_group = _init(rank, port, world=4, tp=2)
    dp_rank = rank // 2
    out = {}
    for key, cls, case in (("col", ColumnParallelCELoRALinear, _layer_case(M_COL, N_COL, seed=1)),
                           ("row", RowParallelCELoRALinear, _layer_case(M_ROW, N_ROW, seed=2))):
        layer = _build_tp_layer(cls, case, tp_group, 0.0)
        t = layer.tp_rank
        x, G = case[f"x{dp_rank}"], case[f"G{dp_rank}"]
        if key == "col":
            G = G[..., t * layer.out_features:(t + 1) * layer.out_features]
        else:
            x = x[..., t * layer.in_features:(t + 1) * layer.in_features]
        layer(x.clone().requires_grad_(True)).backward(G)
        with pytest.raises(ValueError, match="data-parallel group"):
            on_optimizer_step(layer)  # the world group would mix TP shards' scores
        on_optimizer_step(layer, dp_group)
        out[key] = layer.global_selected() if key == "col" else layer.selected
    torch.save(out, Path(out_dir) / f"grid_rank{rank}.pt")
    dist.destroy_process_group()


def test_tp2_x_dp2_selection_uses_the_dp_group(tmp_path):
    _spawn(_grid_worker, str(tmp_path), nprocs=4)
    runs = [torch.load(tmp_path / f"grid_rank{r}.pt") for r in range(4)]
    for key, m, n, seed in (("col", M_COL, N_COL, 1), ("row", M_ROW, N_ROW, 2)):
        case = _layer_case(m, n, seed=seed)
        B0, A0 = _ref_factors(case["W"], R0)
        ws_sq = ((case["W"].double() - B0 @ A0) ** 2).sum(dim=1)

        def select(colsq):
            score = colsq * ws_sq
            if key == "row":
                return topk_indices(score, math.ceil(KEEP * m))
            rows = m // 2
            return torch.cat([topk_indices(score[t * rows:(t + 1) * rows], math.ceil(KEEP * rows)) + t * rows
                              for t in range(2)])

        colsq = [(case[f"G{d}"].double().reshape(-1, m) ** 2).sum(dim=0) for d in range(2)]
        expected = select(colsq[0] + colsq[1])
        # the synced choice differs from either replica's own, so skipping the sync would fail
        assert not torch.equal(expected, select(colsq[0])) and not torch.equal(expected, select(colsq[1]))
        for dp in range(2):  # ranks 2dp, 2dp+1 form one TP group
            if key == "col":
                got = torch.cat([runs[2 * dp]["col"], runs[2 * dp + 1]["col"]]).sort().values
                assert torch.equal(got, expected), (key, dp)
            else:
                for r in (2 * dp, 2 * dp + 1):
                    assert torch.equal(runs[r]["row"], expected), (key, r)


def test_tp_with_zero3_is_rejected():
    with pytest.raises(ValueError, match="ZeRO stage 3"):
        check_tp_zero_stage(tp_size=2, zero_stage=3)
    check_tp_zero_stage(tp_size=2, zero_stage=2)
    check_tp_zero_stage(tp_size=1, zero_stage=3)
