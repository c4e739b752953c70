"""Scale on paper: the cost model's predicted step speed-up of CE-LoRA over dense-dX LoRA.

    python bench/scale_on_paper.py                  # the full table (one row per case)
    python bench/scale_on_paper.py --wide           # one row per model/T/checkpointing
    python bench/scale_on_paper.py --auto-keep 0.5 --seq-lens 2048 --models llama-3-70b
    python bench/scale_on_paper.py --qlora          # 4-bit base: weights dequantized per step

No timing: ``celora_dist.costmodel.step_flops`` counts each step's GEMM FLOPs from the
published shapes alone (nothing is allocated, 70B included) and prints, per model,
tokens per sequence, activation checkpointing and config:

    linear_ceiling   frozen linears + LM head only (attention and adapters left out):
                     the bound a dX-only method cannot pass (flop_ceiling's quantity;
                     here the LoRA (G B) A term is shared and the head runs forward once)
    step_ratio       predicted dense-LoRA step FLOPs / CE-LoRA step FLOPs, with the work
                     both pay alike counted: attention (causal), LoRA GEMMs, head forward
    shrinkable       share of the dense step's FLOPs that CE-LoRA approximates
    attn_share       share of the dense step's FLOPs in attention (grows with T)

Configs: ``released`` (CELoRAConfig(): v/o 0.55, up/down 0.65, q/k/gate exact),
``released+head`` (and the LM head's backward at ``--head-keep``), ``all-auto`` (all
seven projections keep="auto", costed at ``--auto-keep``, the stand-in flop_ceiling
uses) and ``all-auto+head``, and ``fast`` (``celora_dist.preset("fast")``, its auto layers costed at
``--fast-keep``, the mean keep they settled at in the measured sweep). A FLOP ratio is a ceiling for the wall clock too: the
gathers and index work of CE-LoRA are not FLOPs (BENCHMARKS.md measures them).

``--qlora``: on an NF4 double-quantized base (every projection stored 4-bit) each step also
dequantizes the frozen weights, once per forward pass and once per backward, which the FLOP
count leaves out (``celora_dist.costmodel.step_dequant``): QLoRA's backward dequantizes every
row, CE-QLoRA's only the k kept rows of its approximate layers. Per step, independent of T:

    deq_qlora_G / deq_celora_G   weights dequantized (1e9), forward + backward
    deq_ratio / bwd_deq_ratio    QLoRA / CE-QLoRA, the whole step / the backward alone
    read_qlora_GB / read_celora_GB   bytes of codes and scales read for them
    step_ratio                   the FLOP ratio above, same model, T and config (no checkpointing)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py, also when loaded by path
from _common import markdown_table  # noqa: E402  (puts the checkout on sys.path too)

from celora_dist import CELoRAConfig, preset  # noqa: E402
from celora_dist.costmodel import LLAMA_PROJECTIONS, MODEL_SHAPES, step_dequant, step_flops  # noqa: E402

COLUMNS = ["model", "T", "ckpt", "config", "linear_ceiling", "step_ratio", "shrinkable", "attn_share"]
FORMATS = {"linear_ceiling": "{:.3f}x", "step_ratio": "{:.3f}x", "shrinkable": "{:.0%}", "attn_share": "{:.0%}"}


# The mean keep adaptive keep settled at under the fast preset's error budget in the Pareto
# sweep (SmolLM2-135M, real weights, PIQA; BENCHMARKS.md "Pareto"): the fast column's stand-in.
FAST_MEAN_KEEP = 0.64


def configs(head_keep: float, auto_keep: float, fast_keep: float = FAST_MEAN_KEEP
            ) -> dict[str, tuple[CELoRAConfig, float]]:
    """name -> (config, the keep its "auto" layers are costed at)."""
    all_auto = {name: "auto" for name in LLAMA_PROJECTIONS}
    return {"released": (CELoRAConfig(), auto_keep),
            "released+head": (CELoRAConfig(head_keep=head_keep), auto_keep),
            "all-auto": (CELoRAConfig(keep=all_auto, exact=()), auto_keep),
            "all-auto+head": (CELoRAConfig(keep=all_auto, exact=(), head_keep=head_keep), auto_keep),
            "fast": (preset("fast"), fast_keep)}


def rows(models: list[str], seq_lens: list[int], head_keep: float, auto_keep: float,
         causal: bool = True, fast_keep: float = FAST_MEAN_KEEP) -> list[dict]:
    out = []
    for model in models:
        for T in seq_lens:
            for ckpt in (False, True):
                for name, (cfg, keep) in configs(head_keep, auto_keep, fast_keep).items():
                    f = step_flops(MODEL_SHAPES[model], cfg, T, ckpt, auto_keep=keep, causal=causal)
                    out.append({"model": model, "T": T, "ckpt": "yes" if ckpt else "no", "config": name,
                                "linear_ceiling": f.linear_ratio, "step_ratio": f.ratio,
                                "shrinkable": f.shrinkable_share, "attn_share": f.attention / f.dense})
    return out


QLORA_CONFIGS = ("released", "fast")  # the CE-QLoRA configs bench/qlora.py measures
QLORA_COLUMNS = ["model", "T", "config", "deq_qlora_G", "deq_celora_G", "deq_ratio", "bwd_deq_ratio",
                 "read_qlora_GB", "read_celora_GB", "step_ratio"]
QLORA_FORMATS = {"deq_qlora_G": "{:.3f}", "deq_celora_G": "{:.3f}", "deq_ratio": "{:.3f}x",
                 "bwd_deq_ratio": "{:.3f}x", "read_qlora_GB": "{:.3f}", "read_celora_GB": "{:.3f}",
                 "step_ratio": "{:.3f}x"}


def qlora_rows(models: list[str], seq_lens: list[int], head_keep: float, auto_keep: float,
               causal: bool = True, fast_keep: float = FAST_MEAN_KEEP) -> list[dict]:
    """Dequantization per step on a 4-bit base beside the step FLOP ratio (no checkpointing)."""
    out = []
    every = configs(head_keep, auto_keep, fast_keep)
    for model in models:
        for T in seq_lens:
            for name in QLORA_CONFIGS:
                cfg, keep = every[name]
                d = step_dequant(MODEL_SHAPES[model], cfg, auto_keep=keep)
                f = step_flops(MODEL_SHAPES[model], cfg, T, auto_keep=keep, causal=causal)
                out.append({"model": model, "T": T, "config": name, "deq_qlora_G": d.qlora / 1e9,
                            "deq_celora_G": d.celora / 1e9, "deq_ratio": d.ratio, "bwd_deq_ratio": d.backward_ratio,
                            "read_qlora_GB": (d.bytes_forward + d.bytes_qlora) / 1e9,
                            "read_celora_GB": (d.bytes_forward + d.bytes_celora) / 1e9, "step_ratio": f.ratio})
    return out


def wide(table: list[dict]) -> tuple[list[dict], list[str]]:
    """One row per (model, T, ckpt); each config's cell reads "step (≤ ceiling, shrinkable)"."""
    merged: dict[tuple, dict] = {}
    names: list[str] = []
    for r in table:
        key = (r["model"], r["T"], r["ckpt"])
        row = merged.setdefault(key, {"model": r["model"], "T": r["T"], "ckpt": r["ckpt"],
                                      "attn_share": f"{r['attn_share']:.0%}"})
        row[r["config"]] = f"{r['step_ratio']:.3f}x (≤{r['linear_ceiling']:.3f}x, {r['shrinkable']:.0%})"
        if r["config"] not in names:
            names.append(r["config"])
    return list(merged.values()), ["model", "T", "ckpt", "attn_share", *names]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODEL_SHAPES), choices=list(MODEL_SHAPES))
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048, 4096])
    p.add_argument("--head-keep", type=float, default=0.1)
    p.add_argument("--auto-keep", type=float, default=0.6, help='stand-in keep for "auto" layers')
    p.add_argument("--fast-keep", type=float, default=FAST_MEAN_KEEP,
                   help="keep the fast preset's auto layers are costed at (default: measured, see FAST_MEAN_KEEP)")
    p.add_argument("--non-causal", action="store_true", help="count the full T x T attention")
    p.add_argument("--wide", action="store_true", help="one row per model/T/ckpt, configs as columns")
    p.add_argument("--qlora", action="store_true", help="4-bit base: weights dequantized per step, QLoRA vs CE-QLoRA")
    a = p.parse_args(argv)
    if a.qlora:
        table = qlora_rows(a.models, a.seq_lens, a.head_keep, a.auto_keep, not a.non_causal, a.fast_keep)
        print(f"# weights dequantized per step on an NF4 double-quantized base (celora_dist.costmodel.step_dequant), "
              f"every projection 4-bit, between refreshes; fast costed at keep {a.fast_keep}; step_ratio = the "
              f"FLOP ratio (step_flops, no checkpointing)")
        print(markdown_table(table, QLORA_COLUMNS, QLORA_FORMATS))
        return table
    table = rows(a.models, a.seq_lens, a.head_keep, a.auto_keep, causal=not a.non_causal, fast_keep=a.fast_keep)
    print(f"# predicted step FLOP ratio dense-dX LoRA / CE-LoRA (celora_dist.costmodel.step_flops); "
          f"head_keep={a.head_keep} auto_keep={a.auto_keep} fast_keep={a.fast_keep} attention={'full' if a.non_causal else 'causal'}; "
          f"r=r0=14 for both methods")
    if a.wide:
        wrows, cols = wide(table)
        print(markdown_table(wrows, cols, {}))
        print("cell: predicted step ratio (≤ linear-only ceiling, share of the dense step CE-LoRA shrinks)")
    else:
        print(markdown_table(table, COLUMNS, FORMATS))
    return table


if __name__ == "__main__":
    main()
