"""What the measured dX backend choice picks, per projection, on this machine.

    python bench/backend_choice.py                                   # CPU fp32, SmolLM2-135M shapes
    python bench/backend_choice.py --device cuda --dtype bf16 --model llama-3.2-1b --seq-len 2048  # gpu.sh

Under ``CELORA_KERNEL=auto`` every approximate CE-LoRA layer times exact dense dX, the torch
gather path and (CUDA) Triton on its first approximate step and keeps the fastest, exact
unless an approximation is >= 5% faster (docs/design.md §3, celora_dist/kernels/choice.py).
This script runs that choice on a random-weight model of the given shape — a config with
all seven projections approximated at ``--keep``, so every shape is tried — through the
refresh step 0 and the measuring step 1, then prints per projection how many layers chose
which backend and the median times the layers measured (ms per call, summed over nothing:
one process). Random weights suffice: the times depend on shapes and k, not on values.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, also when loaded by path
from _common import machine_line, markdown_table, sync  # noqa: E402

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COLUMNS = ["proj", "m", "n", "k", "T", "layers", "exact", "torch", "triton", "exact_ms", "torch_ms", "triton_ms",
           "best_vs_exact"]
FORMATS = {"exact_ms": "{:.3f}", "torch_ms": "{:.3f}", "triton_ms": "{:.3f}", "best_vs_exact": "{:.2f}x"}


def summarise(model, tokens: int) -> list[dict]:
    """One row per projection name: choices counted, medians averaged over its layers."""
    from celora_dist.layer import celora_layers

    groups: dict[str, list] = defaultdict(list)
    for name, layer in celora_layers(model):
        if layer.dx_choice.chosen is not None:
            groups[name.rsplit(".", 1)[-1]].append(layer)
    rows = []
    for proj in SEVEN:
        layers = groups.get(proj, [])
        if not layers:
            continue
        first = layers[0]
        row = {"proj": proj, "m": first.out_features, "n": first.in_features, "k": first.k, "T": tokens,
               "layers": len(layers)}
        for backend in ("exact", "torch", "triton"):
            row[backend] = sum(layer.dx_choice.chosen == backend for layer in layers)
            times = [layer.dx_choice.times[backend] for layer in layers if backend in layer.dx_choice.times]
            row[f"{backend}_ms"] = 1e3 * statistics.mean(times) if times else float("nan")
        approx = [row[f"{b}_ms"] for b in ("torch", "triton") if row[f"{b}_ms"] == row[f"{b}_ms"]]
        row["best_vs_exact"] = row["exact_ms"] / min(approx) if approx else float("nan")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--model", default="smollm2-135m", help="a bench/end_to_end.py model shape")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--keep", type=float, default=0.55, help="keep of every projection")
    p.add_argument("--smoke", action="store_true", help="tiny model, 32 tokens: for the test suite")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.seq_len = "tiny", 32
    os.environ["CELORA_KERNEL"] = "auto"  # this script is about the measured choice

    import torch
    from end_to_end import DTYPES, MODELS, build_model

    from celora_dist import CELoRAConfig, inject_celora, on_optimizer_step

    if a.model not in MODELS:
        p.error(f"--model must be one of {sorted(MODELS)}")
    print(f"measured dX backend choice, model={a.model} T={a.seq_len} keep={a.keep}; "
          f"{machine_line(a.device, a.dtype)}", flush=True)
    # The rows come out of one measuring step, so they print together at its end; the "# ..."
    # lines say, as each phase finishes, how far a run cut off by a time limit got.
    t0 = time.perf_counter()
    model = build_model(a.model, DTYPES[a.dtype], a.device)
    model.enable_input_require_grads()  # the first block's projections run dX too
    inject_celora(model, CELoRAConfig(keep={name: a.keep for name in SEVEN}, exact=()), verbose=False)
    ids = torch.randint(0, model.config.vocab_size, (1, a.seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(a.device)
    print(f"# model built and CE-LoRA injected in {time.perf_counter() - t0:.1f} s", flush=True)
    for step in ("refresh step 0 (indices)", "measuring step 1 (backends)"):
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        on_optimizer_step(model)
        sync(a.device)
        print(f"# {step} in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = summarise(model, a.seq_len)
    print(markdown_table(rows, COLUMNS, FORMATS))
    print("exact/torch/triton: layers that chose it; *_ms: mean over those layers of each candidate's median "
          "(ms per call, operands included); best_vs_exact: exact / fastest approximation.")
    return rows


if __name__ == "__main__":
    main()
