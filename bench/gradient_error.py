"""Gradient-error study: per-layer relative dX error over training, for the paper's ablations.

    python bench/gradient_error.py                        # embedded SmolLM2-135M on PIQA, 40 steps
    python bench/gradient_error.py --steps 200 --refresh-every 10 --plots docs/img

Each ablation fine-tunes through ``launch/train.py`` with the same data, seed and
steps; the trainer measures, on every exact refresh step, the true relative error
‖dX_approx − dX‖ / ‖dX‖ of the indices then in use, per layer (metrics.jsonl
``grad_rel_error``). Ablations (docs/design.md §1; the paper's names):

- ``full``: the released config, double-LoRA (r0 = 14) + top-k AMM by gradient score;
- ``amm-only``: r0 = 0, the same keeps: plain top-k AMM of ``G @ W0``;
- ``double-lora-only``: one kept feature per layer, so dX ≈ (G B0) A0 (+ that feature):
  the rank-r0 part alone. (keep = 1 is exact: error 0 by construction, tested in
  tests/test_layer.py, so it is not plotted);
- ``static-score``: the released config with score = "static" (‖Ws[i]‖ only, no G).

Writes two PNGs (error vs step per projection; error vs depth at the last
measurement) and prints a markdown table of mean errors per projection.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import markdown_table
from _trainer_runs import run_trainer

# Each ablation: a CELoRAConfig override (JSON, via --celora-config) on the released config.
ABLATIONS = {
    "full": {},
    "amm-only": {"r0": 0},
    "double-lora-only": {"keep": {"v_proj": 1e-6, "o_proj": 1e-6, "up_proj": 1e-6, "down_proj": 1e-6}},
    "static-score": {"score": "static"},
}
PROJECTIONS = ("v_proj", "o_proj", "up_proj", "down_proj")
COLUMNS = ["ablation", "projection", "layers", "first_err", "last_err", "mean_err", "max_err", "final_loss"]
FORMATS = {c: "{:.3f}" for c in ("first_err", "last_err", "mean_err", "max_err", "final_loss")}
_LAYER = re.compile(r"layers\.(\d+)\.")


def error_series(records: list[dict]) -> dict[str, dict[int, float]]:
    """{layer name: {step: relative dX error}} from the trainer's metrics.jsonl records."""
    series: dict[str, dict[int, float]] = {}
    for r in records:
        for name, err in r.get("grad_rel_error", {}).items():
            if "lm_head" not in name:
                series.setdefault(name, {})[r["step"]] = err
    return series


def summarize(name: str, series: dict[str, dict[int, float]], final_loss: float) -> list[dict]:
    rows = []
    for proj in PROJECTIONS:
        layers = {n: s for n, s in series.items() if n.endswith(proj) and s}
        if not layers:
            continue
        steps = sorted({st for s in layers.values() for st in s})
        at = lambda st: [s[st] for s in layers.values() if st in s]  # noqa: E731
        every = [e for s in layers.values() for e in s.values()]
        rows.append({"ablation": name, "projection": proj, "layers": len(layers),
                     "first_err": statistics.mean(at(steps[0])), "last_err": statistics.mean(at(steps[-1])),
                     "mean_err": statistics.mean(every), "max_err": max(every), "final_loss": final_loss})
    return rows


def plot(results: dict[str, dict[str, dict[int, float]]], folder: Path, title: str) -> list[Path]:
    """error-vs-step (mean over layers, min-max band) and error-vs-depth PNGs, one panel per projection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in ("steps", "depth"):
        fig, axes = plt.subplots(1, len(PROJECTIONS), figsize=(4 * len(PROJECTIONS), 3.4), sharey=True)
        for ax, proj in zip(axes, PROJECTIONS):
            for name, series in results.items():
                layers = {n: s for n, s in series.items() if n.endswith(proj) and s}
                if not layers:
                    continue
                if kind == "steps":
                    steps = sorted({st for s in layers.values() for st in s})
                    vals = [[s[st] for s in layers.values() if st in s] for st in steps]
                    line, = ax.plot(steps, [statistics.mean(v) for v in vals], marker="o", ms=3, label=name)
                    ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals],
                                    color=line.get_color(), alpha=0.15)
                else:
                    last = {_depth(n): s[max(s)] for n, s in layers.items()}
                    depths = sorted(last)
                    ax.plot(depths, [last[d] for d in depths], marker="o", ms=3, label=name)
            ax.set_title(proj)
            ax.set_xlabel("optimizer step" if kind == "steps" else "layer index (last measurement)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("relative dX error")
        axes[0].legend(fontsize=8)
        fig.suptitle(title + (" — mean over layers, band = min..max" if kind == "steps" else ""), fontsize=9)
        fig.tight_layout()
        path = folder / f"gradient_error_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _depth(name: str) -> int:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else -1


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ablations", default=",".join(ABLATIONS), help=f"comma list of {list(ABLATIONS)}")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--refresh-every", type=int, default=4, help="measurement (and index refresh) period")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="HF model folder instead of the embedded SmolLM2 (with --data)")
    p.add_argument("--data", default=None)
    p.add_argument("--plots", default="docs/img", help="folder for the PNGs")
    p.add_argument("--out", default=None, help="run folders (default: a temporary folder, removed)")
    p.add_argument("--in-process", action="store_true", help="run the trainer in this process")
    p.add_argument("--smoke", action="store_true", help="4 steps, refresh every 2, in-process: for the test suite")
    a = p.parse_args(argv)
    if (a.model is None) != (a.data is None):
        p.error("give --model and --data together")
    names = [n.strip() for n in a.ablations.split(",") if n.strip()]
    bad = [n for n in names if n not in ABLATIONS]
    if bad:
        p.error(f"unknown ablation(s) {bad}; choose from {list(ABLATIONS)}")
    if a.smoke:
        a.steps, a.refresh_every, a.in_process = 4, 2, True

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="celora-graderr-") if a.out is None else None
    root = Path(tmp.name if tmp else a.out)
    root.mkdir(parents=True, exist_ok=True)
    data = ["--model", a.model, "--data", a.data] if a.model else []
    common = data + ["--max-steps", str(a.steps), "--micro-batch", str(a.micro_batch), "--seq-len", str(a.seq_len),
                     "--refresh-every", str(a.refresh_every), "--seed", str(a.seed), "--method", "celora",
                     "--no-zero-shot", "--no-final-eval"]
    started = time.perf_counter()
    results, rows = {}, []
    try:
        for name in names:
            config = root / f"{name}.json"
            config.write_text(json.dumps(ABLATIONS[name]))
            records = run_trainer(common + ["--celora-config", str(config)], root / name, log, a.in_process)
            losses = [r["loss"] for r in records if "loss" in r and "eval" not in r]
            results[name] = error_series(records)
            rows += summarize(name, results[name], statistics.mean(losses[-5:]))
        title = (f"{Path(a.model).name if a.model else 'SmolLM2-135M-Instruct, PIQA'}: {a.steps} steps x "
                 f"micro-batch {a.micro_batch}, measured every {a.refresh_every} steps")
        paths = plot(results, Path(a.plots), title)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(markdown_table(rows, COLUMNS, FORMATS))
    print(f"\nplots: {', '.join(str(p) for p in paths)}; total {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main()
