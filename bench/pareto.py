"""Speed/accuracy sweep: step time of CE-LoRA configs vs PEFT LoRA on the real model, joined
with the accuracy study's runs into one Pareto table.

    python bench/pareto.py --tokens 512,2048 --rounds 7 --budgets 0.3,0.5 --head-keep 0.1
    python bench/pareto.py ... --accuracy /tmp/acc/runs/piqa/runs.jsonl   # + accuracy columns
    python bench/pareto.py --timing rows.json --accuracy runs.jsonl      # join saved timing (--json)

Timing: the embedded SmolLM2-135M-Instruct (real weights, so adaptive keep picks the k it
picks in training) on one batch of real PIQA text of T tokens; every method is its own
model copy + AdamW, warmed up through the exact refresh step 0 (adaptive layers choose k)
and the measuring step 1 (each layer chooses its dX backend, docs/design.md §3), then
``--rounds`` interleaved rounds of forward + backward + optimizer step; median and IQR.
Methods (named as ``bench/accuracy.py`` names its runs, so the two join):

    lora                    PEFT LoRA r=16 on the seven projections (the baseline)
    celora                  the released config (v/o 0.55, up/down 0.65; q/k/gate exact)
    celora-head<H>          released + vocab-sparse LM head keeping H of the vocabulary
    celora-all<B>           all seven projections keep="auto" under error budget B
    celora-all<B>-head<H>   that + the vocab-sparse head
    preset-<name>           celora_dist.preset(name) as it is today (preset-released, preset-fast)

The accuracy runs (``bench/accuracy.py --methods lora,celora,celora-head,celora-all
--all-budgets B,.. --head-keep H``) give accuracy, its paired delta to LoRA and the dX error
they measured. Under ``CELORA_KERNEL=auto`` (default) layers whose approximation does not
pay run exact: ``approx_share`` says how many of the approximate layers run approximated.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import sys

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, also when loaded by path
from _common import iqr, machine_line, markdown_table  # noqa: E402
from accuracy import SEVEN  # noqa: E402
from end_to_end import Runner  # noqa: E402

from celora_dist import CELoRAConfig, inject_celora, preset, telemetry  # noqa: E402

TIMING_COLUMNS = ["tokens", "method", "step_ms", "step_iqr_ms", "speedup", "beyond_iqr", "mean_keep", "approx_share"]
COLUMNS = [*TIMING_COLUMNS, "accuracy", "delta_vs_lora", "delta_std", "layer_err", "head_err"]  # + join_accuracy
FORMATS = {"step_ms": "{:.0f}", "step_iqr_ms": "{:.0f}", "speedup": "{:.3f}x", "mean_keep": "{:.3f}",
           "approx_share": "{:.2f}", "accuracy": "{:.4f}", "delta_vs_lora": "{:+.4f}", "delta_std": "{:.4f}",
           "layer_err": "{:.3f}", "head_err": "{:.3f}"}


def method_config(method: str) -> CELoRAConfig | None:
    """The CELoRAConfig a method name stands for (None: PEFT LoRA)."""
    if method == "lora":
        return None
    if method == "celora":
        return CELoRAConfig()
    if method.startswith("preset-"):  # timed as a user gets it: follows any change to presets.py
        return preset(method[len("preset-"):])
    if method.startswith("celora-head"):
        return CELoRAConfig(head_keep=float(method[len("celora-head"):]))
    if method.startswith("celora-all"):
        budget, _, head = method[len("celora-all"):].partition("-head")
        return CELoRAConfig(keep={name: "auto" for name in SEVEN}, exact=(), error_budget=float(budget),
                            head_keep=float(head) if head else None)
    raise ValueError(f"unknown method {method!r}")


def sweep_methods(budgets: list[float], head_keeps: list[float]) -> list[str]:
    heads = [f"celora-head{h:g}" for h in head_keeps]
    alls = [f"celora-all{b:g}{s}" for b in budgets for s in ["", *(f"-head{h:g}" for h in head_keeps)]]
    return ["lora", "celora", *heads, *alls]


def real_model_and_tokens(tokens: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The embedded SmolLM2-135M-Instruct and one (1, tokens) batch of PIQA text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from celora_dist.train.embedded import ensure_model, piqa_path

    folder = ensure_model(verbose=False)
    tok = AutoTokenizer.from_pretrained(folder)
    text = " ".join(f"{r['question']} {r['options']}"
                    for r in (json.loads(line) for line in piqa_path().read_text().splitlines() if line.strip()))
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise SystemExit(f"error: the PIQA text has only {ids.shape[1]} tokens, fewer than --tokens {tokens}")
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    return model, ids


def build(method: str, base: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(base)
    cfg = method_config(method)
    if cfg is None:
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, use_rslora=True, task_type="CAUSAL_LM",
                                                target_modules=list(SEVEN)))
    inject_celora(model, cfg, verbose=False)
    return model


def backend_stats(model: torch.nn.Module) -> tuple[float, float]:
    """(mean keep k/m, share of measured layers running the approximation) of a CE-LoRA model."""
    entries = [t for t in telemetry(model).values() if t["kind"] == "linear"]
    keeps = [t["k"] / t["m"] for t in entries]
    chosen = [t["dx_backend"] for t in entries if t.get("dx_backend") is not None]
    share = sum(b != "exact" for b in chosen) / len(chosen) if chosen else math.nan
    return (statistics.mean(keeps) if keeps else math.nan), share


def time_methods(methods: list[str], tokens: int, rounds: int) -> list[dict]:
    base, ids = real_model_and_tokens(tokens)
    runners = {}
    for method in methods:
        runners[method] = Runner(build(method, base), ids, "cpu", checkpointing=False)
        for _ in range(2):  # refresh step 0 (k chosen), measuring step 1 (backend chosen)
            runners[method].step()
    del base
    steps: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(rounds):
        for method, runner in runners.items():
            start = time.perf_counter()
            runner.step()
            steps[method].append(time.perf_counter() - start)
        print(f"  round {r + 1}/{rounds} (T={tokens})", flush=True)
    lora = statistics.median(steps["lora"])
    rows = []
    for method, runner in runners.items():
        med, spread = statistics.median(steps[method]), iqr(steps[method])
        keep, share = backend_stats(runner.model) if method != "lora" else (math.nan, math.nan)
        rows.append({"tokens": tokens, "method": method, "step_ms": 1e3 * med, "step_iqr_ms": 1e3 * spread,
                     "speedup": lora / med, "beyond_iqr": (lora - med) > max(spread, iqr(steps["lora"])),
                     "mean_keep": keep, "approx_share": share})
    return rows


def join_accuracy(rows: list[dict], runs_path: Path | None) -> None:
    """Add accuracy (mean over seeds), its delta to LoRA paired by seed, and the runs' dX errors."""
    runs = [json.loads(line) for line in runs_path.read_text().splitlines() if line.strip()] if runs_path else []
    by_method: dict[str, dict[int, dict]] = {}
    for run in runs:
        by_method.setdefault(run["method"], {})[run["seed"]] = run
    lora = by_method.get("lora", {})
    for row in rows:
        seeds = by_method.get(row["method"], {})
        paired = [seeds[s]["accuracy"] - lora[s]["accuracy"] for s in seeds if s in lora]
        row["accuracy"] = statistics.mean(r["accuracy"] for r in seeds.values()) if seeds else math.nan
        row["delta_vs_lora"] = statistics.mean(paired) if paired else math.nan
        row["delta_std"] = statistics.stdev(paired) if len(paired) > 1 else math.nan
        for key in ("layer_err", "head_err"):
            values = [r[key] for r in seeds.values() if r.get(key) is not None and not math.isnan(r[key])]
            row[key] = statistics.mean(values) if values else math.nan


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="512,2048", help="comma list of tokens per micro-batch (batch 1)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds per method (>= 7 for the table)")
    p.add_argument("--budgets", default="0.3,0.5", help="error budgets of the all-seven-auto configs")
    p.add_argument("--head-keep", default="0.1", help="comma list of vocab-sparse head keeps ('' for none)")
    p.add_argument("--methods", default=None, help="comma list overriding the sweep (names as above)")
    p.add_argument("--accuracy", type=Path, default=None, help="bench/accuracy.py's runs.jsonl to join")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--timing", type=Path, default=None,
                   help="a --json file of an earlier run: reuse its timing rows instead of measuring")
    a = p.parse_args(argv)
    budgets = [float(b) for b in a.budgets.split(",") if b.strip()]
    heads = [float(h) for h in a.head_keep.split(",") if h.strip()]
    methods = a.methods.split(",") if a.methods else sweep_methods(budgets, heads)
    for method in methods:
        method_config(method)  # unknown names fail before any model is built
    if "lora" not in methods:
        methods.insert(0, "lora")
    for flag, path, hint in (("--accuracy", a.accuracy, "bench/accuracy.py --out DIR writes DIR/<task>/runs.jsonl"),
                             ("--timing", a.timing, "it takes what --json wrote")):
        if path is not None and not path.is_file():
            raise SystemExit(f"error: {flag} {path} is not a file ({hint})")
    if a.timing is not None:
        rows = [{key: row[key] for key in TIMING_COLUMNS} for row in json.loads(a.timing.read_text())]
    else:
        print(f"pareto sweep, SmolLM2-135M-Instruct real weights, PIQA text; {machine_line('cpu', 'fp32')}",
              flush=True)
        rows = []
        for tokens in (int(t) for t in a.tokens.split(",")):
            rows += time_methods(methods, tokens, a.rounds)
    join_accuracy(rows, a.accuracy)
    print(markdown_table(rows, COLUMNS, FORMATS))
    print("speedup = LoRA's median step / this one's; beyond_iqr: the gain exceeds both methods' IQR; "
          "approx_share: measured layers running the approximation (the rest run exact: it did not pay); "
          "accuracy/delta/err: bench/accuracy.py runs (delta paired by seed).")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
