"""The benchmarks run at their smoke sizes and print well-formed tables: bench/layer_backward.py,
bench/step_profile.py (tiny model), bench/pareto.py, bench/backend_choice.py and bench/gpu.sh (DEVICE=cpu).

No timing assertions (the machine is shared); the numbers must be finite and positive,
the ratio columns must be the ratios of the printed times, and the profile's categories
must add up to the step and hold the ops a step of the tiny model is known to contain.
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "layer_backward.py"


def _load(path: Path = BENCH):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _parse(text: str) -> tuple[list[str], list[dict[str, str]]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return split[0], [dict(zip(split[0], cells)) for cells in split[2:]]


def _check_rows(bench, rows, methods, rel=1e-9, abs_=0.0, check_ratios=True):
    """rel / abs_: how far a ratio may be from the ratio of the times (printed tables round)."""
    assert len(rows) == 2 * len(bench.KEEPS)  # 2 smoke shapes x 4 keeps
    for row in rows:
        for col in ("dense_ms", "ceiling", *(f"{m}_{s}" for m in methods for s in ("ms", "x", "%ceil"))):
            # printed ratios may round to 0.00 (interpreted Triton is far slower than dense)
            positive = row[col] > 0 or (not check_ratios and not col.endswith("_ms") and row[col] == 0)
            assert math.isfinite(row[col]) and positive, (col, row)
        for name in methods if check_ratios else ():
            ratio = row["dense_ms"] / row[f"{name}_ms"]
            assert abs(row[f"{name}_x"] - ratio) <= rel * ratio + abs_, (name, row)
        assert row["k"] == math.ceil(row["keep"] * row["m"])
        expected = 1.0 if row["keep"] == 1.0 else row["m"] / (row["k"] + bench.R0 + bench.R)
        assert abs(row["ceiling"] - expected) <= 1e-12 + abs_


def test_bench_smoke(capsys):
    bench = _load()
    rows = bench.main(["--device", "cpu", "--smoke"])
    header, printed = _parse(capsys.readouterr().out)
    assert header == list(bench.COLUMNS)
    assert set(header) >= {"dense_ms", "torch_ms", "triton_ms", "ceiling", "torch_x", "torch_%ceil",
                           "triton_x", "triton_%ceil"}
    assert len(printed) == len(rows)
    _check_rows(bench, rows, ["torch"])
    for row in rows:  # on CPU without the interpreter the Triton columns are empty
        assert math.isnan(row["triton_ms"]) and math.isnan(row["triton_x"])
    assert printed[0]["triton_ms"] == "-"


def test_bench_smoke_triton_columns_under_interpreter():
    """The Triton columns filled in (kernels run by the interpreter) and agreeing with torch."""
    bench = _load()
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, printed = _parse(proc.stdout)
    assert header == list(bench.COLUMNS)
    rows = [{k: (float(v) if k not in ("model", "proj") else v) for k, v in row.items()} for row in printed]
    for row in rows:
        row["k"] = int(row["k"])
    # ratios vs printed (rounded) times are checked in-process above; sub-0.1 ms times
    # printed to 2 decimals make that comparison meaningless here
    _check_rows(bench, rows, ["torch", "triton"], abs_=0.006, check_ratios=False)
    assert all(row["triton_err"] < 1e-5 for row in rows)  # fp32: summation order only


def test_step_profile_smoke(capsys, monkeypatch):
    """One profiled step per method of the tiny model at T = 32: every category filled where the
    model has such ops, the rows summing to the step, and the op counts the model implies."""
    monkeypatch.setenv("CELORA_KERNEL", "torch")  # main() sets it; restored after the test
    bench = _load(ROOT / "bench" / "step_profile.py")
    (result,) = bench.main(["--model", "tiny", "--tokens", "32", "--steps", "1"])
    header, printed = _parse(capsys.readouterr().out)
    assert header == bench.COLUMNS
    assert [row["category"] for row in printed] == [*bench.CATEGORIES, bench.STEP]
    rows = {row["category"]: row for row in result["rows"]}
    step = rows[bench.STEP]
    for m in bench.METHODS:
        assert step[f"{m}_ms"] > 0
        assert sum(rows[c][f"{m}_ms"] for c in bench.CATEGORIES) == pytest.approx(step[f"{m}_ms"], rel=1e-9)
        for c in ("forward GEMMs", "dX GEMMs", "LoRA GEMMs", "attention", "LM head", "optimizer", "other kernels"):
            assert rows[c][f"{m}_ms"] > 0, (m, c)
        assert rows["overhead"][f"{m}_ms"] >= 0  # op self times lie inside the wall time
        # 2 decoder layers x 7 targeted linears; layer 0's q/k/v read the frozen embedding: no dX
        assert (rows["forward GEMMs"][f"{m}_calls"], rows["dX GEMMs"][f"{m}_calls"]) == (14, 11)
        assert rows["LM head"][f"{m}_calls"] == 2  # forward and dX
        assert result["summary"]["unmatched"][m] == []  # every matrix product has a known shape
        assert printed[-1][f"{m}_ms"] == f"{step[f'{m}_ms']:.1f}"
    # PEFT gathers nothing; CE-LoRA's 7 approximate layers with a dX (v of layer 1, o, up, down) each
    # index_select G and W0 and cat [s.B | B0] and [A ; A0]
    assert (rows["gathers"]["lora_calls"], rows["gathers"]["celora_calls"]) == (0, 28)
    assert rows["gathers"]["lora_ms"] == 0 < rows["gathers"]["celora_ms"]
    summary = result["summary"]
    assert summary["speedup"] == pytest.approx(summary["lora_step_ms"] / summary["celora_step_ms"])
    layer = {m: sum(rows[c][f"{m}_ms"] for c in bench.LAYER) for m in bench.METHODS}
    assert summary["layer_gain"] == pytest.approx(layer["lora"] / layer["celora"])
    assert summary["rest_delta_ms"] == pytest.approx(step["delta_ms"] - (layer["celora"] - layer["lora"]))
    with torch.device("meta"):
        probe = bench.build_model("tiny", torch.float32, "meta")
    assert summary["ceiling"] == bench.flop_ceiling(probe, bench.CELoRAConfig(), include_head=True).ratio


def test_pareto_methods_and_accuracy_join(tmp_path):
    """bench/pareto.py: method names map to the configs bench/accuracy.py trains, and the join
    averages accuracy over seeds with the delta to LoRA paired by seed."""
    import json

    pareto = _load(ROOT / "bench" / "pareto.py")
    accuracy = sys.modules["accuracy"]
    methods = pareto.sweep_methods([0.3], [0.1])
    assert methods == ["lora", "celora", "celora-head0.1", "celora-all0.3", "celora-all0.3-head0.1"]
    assert methods[1:] == accuracy.expand_methods(["celora", "celora-head", "celora-all"], [0.1], [0.3])
    cfg = pareto.method_config("celora-all0.3-head0.1")
    assert cfg.keep == {name: "auto" for name in accuracy.SEVEN} and cfg.exact == ()
    assert (cfg.error_budget, cfg.head_keep) == (0.3, 0.1)
    flags = accuracy.method_flags("celora-all0.3-head0.1", 0.9)  # the same config through the trainer's CLI
    assert flags[flags.index("--keep") + 1] == accuracy.ALL_AUTO and flags[-2:] == ["--head-keep", "0.1"]
    assert flags[flags.index("--error-budget") + 1] == "0.3"
    assert pareto.method_config("lora") is None
    with pytest.raises(ValueError):
        pareto.method_config("celora-fancy")

    runs = [{"method": "lora", "seed": s, "accuracy": a, "layer_err": float("nan"), "head_err": float("nan")}
            for s, a in ((0, 0.60), (1, 0.70))]
    runs += [{"method": "celora-all0.3", "seed": s, "accuracy": a, "layer_err": e, "head_err": float("nan")}
             for s, a, e in ((0, 0.62, 0.60), (1, 0.66, 0.68))]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    rows = [{"method": "lora"}, {"method": "celora-all0.3"}, {"method": "celora"}]
    pareto.join_accuracy(rows, path)
    assert rows[1]["accuracy"] == pytest.approx(0.64)
    assert rows[1]["delta_vs_lora"] == pytest.approx(((0.62 - 0.60) + (0.66 - 0.70)) / 2)
    assert rows[1]["delta_std"] == pytest.approx(math.sqrt(2) * 0.03)  # stdev of (+0.02, -0.04)
    assert rows[1]["layer_err"] == pytest.approx(0.64)  # the runs' measured dX error, averaged
    assert math.isnan(rows[2]["accuracy"])  # not trained: nothing joined

    # --timing: saved timing rows (what --json wrote) joined without measuring again
    timing = tmp_path / "timing.json"
    timing.write_text(json.dumps([{"tokens": 512, "method": m, "step_ms": ms, "step_iqr_ms": 5.0, "speedup": s,
                                   "beyond_iqr": s > 1.05, "mean_keep": 0.5, "approx_share": 1.0,
                                   "accuracy": 0.0}  # a stale column: replaced by the join
                                  for m, ms, s in (("lora", 100.0, 1.0), ("celora-all0.3", 80.0, 1.25))]))
    joined = pareto.main(["--timing", str(timing), "--accuracy", str(path)])
    assert [r["method"] for r in joined] == ["lora", "celora-all0.3"]
    assert joined[1]["speedup"] == 1.25 and joined[1]["accuracy"] == pytest.approx(0.64)
    with pytest.raises(SystemExit, match="--timing"):
        pareto.main(["--timing", str(tmp_path / "missing.json")])


def test_backend_choice_smoke(capsys, monkeypatch):
    """bench/backend_choice.py on the tiny model: every projection measured and a choice made
    for each measured layer, times positive, best_vs_exact = the ratio of the printed times."""
    monkeypatch.setenv("CELORA_KERNEL", "auto")  # the script sets it too; restored after the test
    bench = _load(ROOT / "bench" / "backend_choice.py")
    rows = bench.main(["--smoke"])
    assert [r["proj"] for r in rows] == list(bench.SEVEN)
    for row in rows:
        assert row["exact"] + row["torch"] + row["triton"] == row["layers"] == 2  # both blocks
        assert row["triton"] == 0 and math.isnan(row["triton_ms"])  # CPU: no Triton candidate
        assert row["exact_ms"] > 0 and row["torch_ms"] > 0
        assert row["best_vs_exact"] == pytest.approx(row["exact_ms"] / row["torch_ms"])
    assert "| q_proj |" in capsys.readouterr().out


GPU_STEPS = ["layer", "head", "e2e", "e2e_ckpt", "backend", "paper"]


def test_gpu_script_dry_run_lists_the_cuda_commands(tmp_path):
    """bench/gpu.sh --dry-run: every step with its CUDA command and time limit, nothing run."""
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "OUT": str(tmp_path / "never-written")})
    assert out.returncode == 0, out.stderr
    for step in GPU_STEPS:
        assert f"[gpu.sh] {step} (limit " in out.stdout
    assert "--device cuda --dtype bf16" in out.stdout
    assert not (tmp_path / "never-written").exists()


def test_gpu_script_runs_every_step_on_cpu(tmp_path):
    """DEVICE=cpu runs the GPU script's steps at their smoke sizes: what a first GPU call will do,
    minus the sizes — each step exits 0 and leaves its table, and summary.txt records it."""
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(tmp_path)}
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    for step in GPU_STEPS:
        assert f"[gpu.sh] {step}: rc=0 ok" in summary, summary
        table = [ln for ln in (tmp_path / f"{step}.md").read_text().splitlines() if ln.startswith("|")]
        assert len(table) >= 3, f"{step}.md has no table rows"  # header, separator, >= 1 row
