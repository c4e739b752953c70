"""Layer-backward benchmark: CE-LoRA dX against the dense dX PEFT's LoRA backward computes.

Every method is the call a layer's backward makes (``celora_dist.layer.local_backward``):
the low-rank operands from ``low_rank_operands`` — the one GEMM of G that dA needs
anyway — then the dX op ``grad_input(G, W0, I, left, right)`` on one backend. For each
projection shape (m = out features, n = in features), token count T and keep ratio it
times, interleaved in one run and reported as medians of ``--repeats``:

    dense   I = None, (left, right) = (s·G B, A)                       (an exact layer = PEFT's LoRA)
    torch   I = top-k, (left, right) = (G [s·B | B0_Ī], [A ; A0]) on celora_dist.ops.amm.celora_grad_input
    triton  the same on celora_grad_input_triton                       (CUDA only)

and prints each speed-up over dense next to the FLOP ceiling m / (k + r0 + r)
(docs/design.md §3; 1.0 at keep 1.0, where the layer is exact and both paths are the
dense GEMM) and the fraction of the ceiling achieved. Example:

    python bench/layer_backward.py --device cpu              # scaled shapes, 1-2 min on 2 cores
    python bench/layer_backward.py --device cuda --shapes llama --dtype bf16
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py, also when loaded by path
from _common import interleaved_medians, markdown_table  # noqa: E402  (puts the checkout on sys.path too)

from celora_dist.layer import low_rank_operands  # noqa: E402
from celora_dist.ops.amm import celora_grad_input  # noqa: E402

# (hidden, intermediate, kv width) of the LLaMA models the issue names.
MODELS = {"llama3-8b": (4096, 14336, 1024), "llama3.2-1b": (2048, 8192, 512)}
KEEPS = (0.3, 0.55, 0.65, 1.0)
R0, R = 14, 14  # the released config: r0 = 14 double-LoRA rank, trainable r = 14
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("torch", "triton")
COLUMNS = ("model", "proj", "m", "n", "T", "keep", "k", "dense_ms", "torch_ms", "triton_ms",
           "ceiling", "torch_x", "torch_%ceil", "triton_x", "triton_%ceil", "triton_err")


def projection_shapes(model: str, scale: int = 1) -> list[tuple[str, int, int]]:
    """(proj, m, n) for q/k/v/o/gate/up/down, every dimension divided by ``scale``."""
    h, i, kv = (d // scale for d in MODELS[model])
    return [("q", h, h), ("k", kv, h), ("v", kv, h), ("o", h, h),
            ("gate", i, h), ("up", i, h), ("down", h, i)]


def plan(shapes: str, tokens: list[int] | None,
         models: list[str] | None = None) -> list[tuple[str, str, int, int, list[int]]]:
    """(model, proj, m, n, token counts) rows of ``models`` (default all); k and v share a
    shape, so v is timed once as k/v."""
    if shapes == "smoke":
        return [("tiny", "up", 48, 32, tokens or [24]), ("tiny", "down", 32, 48, tokens or [24])]
    scale, default_tokens = (1, [2048, 4096, 8192, 16384]) if shapes == "llama" else (4, [2048])
    rows = []
    for model in models or MODELS:
        for proj, m, n in projection_shapes(model, scale):
            if proj in ("k", "v"):
                if proj == "v":
                    continue
                proj = "k/v"
            if proj == "up":  # gate and up share the shape
                continue
            rows.append((model if scale == 1 else f"{model}/{scale}",
                         "gate/up" if proj == "gate" else proj, m, n, tokens or default_tokens))
    return rows


def bench_case(m: int, n: int, T: int, keep: float, dtype: torch.dtype, device: torch.device,
               repeats: int, triton_fn: Callable | None) -> dict[str, float]:
    """Median seconds of each method for one (m, n, T, keep), methods interleaved per repeat."""
    # Drawn on the device: from a CPU generator the full CUDA plan drew ~4.5e9 numbers on the
    # host and copied every case over (issue 25); its largest G alone is 16384 x 14336.
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    G, W0 = rnd(T, m), rnd(m, n, std=m ** -0.5)
    B0, A0 = rnd(m, R0, std=0.1), rnd(R0, n, std=0.1)
    lora_B, lora_A, s = rnd(m, R, std=0.1), rnd(R, n, std=0.1), 2.0
    k = math.ceil(keep * m)
    sel = B0_dropped = None  # keep 1.0: the layer is exact (selected=None), as CELoRALinear runs it
    if k < m:
        sel = torch.randperm(m, generator=g, device=device)[:k].sort().values
        B0_dropped = B0.clone()
        B0_dropped[sel] = 0  # the layer caches it per selection

    def layer_call(fn, selected, dropped):
        def call():
            _, left, right = low_rank_operands(G, lora_B, lora_A, s, dropped, A0, True)
            return fn(G, W0, selected, left, right)
        return call

    methods = {
        "dense": layer_call(celora_grad_input, None, None),
        "torch": layer_call(celora_grad_input, sel, B0_dropped),
    }
    if triton_fn is not None:
        methods["triton"] = layer_call(triton_fn, sel, B0_dropped)
    # one warm-up round (and Triton autotuning) outside the timings
    result: dict[str, float] = interleaved_medians(methods, repeats, device.type, warmup=1)
    result["k"] = k
    if triton_fn is not None:  # Triton against the reference, relative to max|dX|
        ref, out = methods["torch"]().float(), methods["triton"]().float()
        result["triton_err"] = float((out - ref).abs().max() / ref.abs().max())
    return result


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    """All rows of the table, printed as they are measured."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    triton_fn = None
    # CUDA, or any device under TRITON_INTERPRET=1 (slow; for checking this script on CPU)
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        from celora_dist.kernels.amm_triton import celora_grad_input_triton as triton_fn
    print(markdown_table([], list(COLUMNS), FORMATS), flush=True)  # the header; rows follow as measured
    rows = []
    for model, proj, m, n, token_counts in plan(args.shapes, args.tokens, args.models):
        for T in token_counts:
            for keep in args.keeps:
                try:
                    res = bench_case(m, n, T, keep, dtype, device, args.repeats, triton_fn)
                except Exception as e:  # noqa: BLE001  a failing kernel costs its column, not the table
                    if triton_fn is None:
                        raise
                    traceback.print_exc()
                    print(f"# triton failed at {model} {proj} T={T} keep={keep} ({type(e).__name__}: "
                          f"{str(e).strip()[:200]}); triton columns empty from here on", flush=True)
                    triton_fn = None
                    res = bench_case(m, n, T, keep, dtype, device, args.repeats, triton_fn)
                k = res["k"]
                ceiling = m / (k + R0 + R) if k < m else 1.0
                row = {"model": model, "proj": proj, "m": m, "n": n, "T": T, "keep": keep, "k": k,
                       "dense_ms": 1e3 * res["dense"], "ceiling": ceiling}
                for name in METHODS:
                    row[f"{name}_ms"] = 1e3 * res[name] if name in res else float("nan")
                    ratio = res["dense"] / res[name] if name in res else float("nan")
                    row[f"{name}_x"] = ratio
                    row[f"{name}_%ceil"] = 100 * ratio / ceiling
                row["triton_err"] = res.get("triton_err", float("nan"))
                rows.append(row)
                print(markdown_table([row], list(COLUMNS), FORMATS).splitlines()[-1], flush=True)
    return rows


# Times and errors to 4 significant digits (tiny smoke times too), ratios to 2 decimals.
FORMATS = {c: ("{:.4g}" if c.endswith(("_ms", "_err")) else "{:.2f}")
           for c in COLUMNS if c == "keep" or c.endswith(("_ms", "_err", "_x", "ceil", "ceiling"))}


def _machine(device: str) -> str:
    """The processor the numbers belong to (GPU name, or /proc/cpuinfo's model name)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} logical CPUs"
    except OSError:
        pass
    return f"cpu, {os.cpu_count()} logical CPUs"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--shapes", choices=("small", "llama"), default=None,
                   help="small: LLaMA shapes / 4 (CPU default); llama: full shapes (cuda default)")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=None,
                   help="the models whose projection shapes are timed (default: all)")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts T (default per --shapes)")
    p.add_argument("--keeps", type=float, nargs="+", default=list(KEEPS))
    p.add_argument("--repeats", type=int, default=None, help="default 5 (cpu), 20 (cuda)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is steadier on a shared machine")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat: checks the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.repeats = "smoke", args.repeats or 1
    args.shapes = args.shapes or ("llama" if args.device == "cuda" else "small")
    args.repeats = args.repeats or (20 if args.device == "cuda" else 5)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {_machine(args.device)}")
    print(f"# device={args.device} dtype={args.dtype} shapes={args.shapes} "
          f"repeats={args.repeats} r0={R0} r={R} threads={torch.get_num_threads()} torch={torch.__version__}")
    return run(args)


if __name__ == "__main__":
    main()
