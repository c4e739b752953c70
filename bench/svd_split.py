"""Exact vs randomized SVD split (CELoRAConfig.svd): what the faster start-up costs.

    python bench/svd_split.py                           # short: 4 SmolLM2 blocks, one 2048x2048 matrix
    python bench/svd_split.py --blocks all --shapes llama1b --repeats 3

Per approximate layer and method (exact ``torch.linalg.svd`` and randomized settings
``pP qQ`` = P oversampling columns, Q power iterations), measured back to back in one
process so machine load hits every method alike:

- ``ms``: time of ``double_lora_factors`` (median, methods interleaved); ``x_exact`` the
  exact split's time over this one's;
- ``excess``: ‖Ws‖_F / ‖Ws_exact‖_F − 1, the residual above the optimum (Eckart–Young);
- ``ov_static`` / ``ov_grad``: share of the top-k rows that agree with the exact split's,
  by ‖Ws[i, :]‖ alone and by the gradient score ‖G[:, i]‖·‖Ws[i, :]‖;
- ``dx_err``: relative dX error ‖dX_approx − G W0‖ / ‖G W0‖ of the layer's backward with
  indices chosen from one batch's G and applied to the next batch's (as a refresh step's
  choice is used on later steps); ``dx_err − exact`` in points is what the method adds.

Weights: the embedded SmolLM2-135M-Instruct's v/o/up/down projections (released keeps
0.55 / 0.65, r0 = 14) with G captured from the base model's backward on embedded PIQA
batches; and LLaMA-3.2-1B-shaped random weights with the power-law spectrum
σ_j = (j + 1)^(-ALPHA) and synthetic G (per-feature scales log-normal, the heavy-tailed
column norms real G has). Prints markdown tables.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py, also when loaded by path
from _common import interleaved_medians, machine_line, markdown_table  # noqa: E402  (puts the checkout on sys.path too)

from celora_dist.config import RELEASED_KEEP, SVDMethod, num_kept  # noqa: E402
from celora_dist.factors import double_lora_factors  # noqa: E402
from celora_dist.ops.amm import celora_grad_input, gradient_scores  # noqa: E402
from celora_dist.selection import select_indices  # noqa: E402

R0 = 14
ALPHA = 0.5  # spectrum exponent of the random weights: σ14/σ15 = 1.03 (SmolLM2: 1.007-1.010)
METHODS = {"exact": SVDMethod(), "p8 q1": SVDMethod("randomized", 8, 1), "p8 q2": SVDMethod("randomized", 8, 2),
           "p8 q4": SVDMethod("randomized", 8, 4), "p16 q4": SVDMethod("randomized", 16, 4),
           "p16 q8": SVDMethod("randomized", 16, 8)}
SHAPES = {"short": [("2048x2048", 2048, 2048)],
          "llama1b": [("v/o-like 2048x2048", 2048, 2048), ("up 8192x2048", 8192, 2048), ("down 2048x8192", 2048, 8192)]}
COLUMNS = ["weights", "method", "layers", "ms", "x_exact", "excess", "excess_max", "ov_static", "ov_grad",
           "dx_err", "dx_vs_exact_pts"]
FORMATS = {"ms": "{:.1f}", "x_exact": "{:.1f}", "excess": "{:.2e}", "excess_max": "{:.2e}", "ov_static": "{:.3f}",
           "ov_grad": "{:.3f}", "dx_err": "{:.4f}", "dx_vs_exact_pts": "{:+.3f}"}


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of the indices in ``a`` that are also in ``b`` (same k)."""
    return torch.isin(a, b).float().mean().item()


def dx_error(G: torch.Tensor, W: torch.Tensor, B0: torch.Tensor, A0: torch.Tensor, selected: torch.Tensor) -> float:
    """Relative error of the CE-LoRA dX = G[:, I] W[I] + (G B0_Ī) A0 (the layer's contract) vs G W."""
    B0_dropped = B0.clone()
    B0_dropped[selected] = 0
    approx = celora_grad_input(G, W, selected, G @ B0_dropped, A0)
    exact = G @ W
    return ((approx - exact).norm() / exact.norm()).item()


def study_layer(W: torch.Tensor, G_sel: torch.Tensor, G_eval: torch.Tensor, keep: float, repeats: int
                ) -> dict[str, dict]:
    """{method: measurements} for one weight (see the module docstring)."""
    out: dict[str, list] = {}
    times = interleaved_medians({name: (lambda s=s: double_lora_factors(W, R0, W.dtype, svd=s))
                                 for name, s in METHODS.items()}, repeats, "cpu", warmup=0)
    k = num_kept(keep, W.shape[0])
    colsq = gradient_scores(G_sel)
    found = {name: double_lora_factors(W, R0, W.dtype, svd=s) for name, s in METHODS.items()}
    ref_B0, ref_A0, ref_sq = found["exact"]
    ref_static = select_indices(None, ref_sq, k, "static")
    ref_grad = select_indices(colsq, ref_sq, k, "gradient")
    ref_norm = ref_sq.double().sum().sqrt().item()
    ref_err = dx_error(G_eval, W, ref_B0, ref_A0, ref_grad)
    for name, (B0, A0, sq) in found.items():
        grad = select_indices(colsq, sq, k, "gradient")
        err = dx_error(G_eval, W, B0, A0, grad)
        out[name] = dict(ms=1e3 * times[name], x_exact=times["exact"] / times[name],
                         excess=sq.double().sum().sqrt().item() / ref_norm - 1,
                         ov_static=overlap(select_indices(None, sq, k, "static"), ref_static),
                         ov_grad=overlap(grad, ref_grad), dx_err=err, dx_vs_exact_pts=100 * (err - ref_err))
    return out


def aggregate(weights: str, per_layer: list[dict[str, dict]]) -> list[dict]:
    """One row per method: means over the layers (excess also its max)."""
    rows = []
    for name in METHODS:
        cells = [layer[name] for layer in per_layer]
        row = {"weights": weights, "method": name, "layers": len(cells)}
        for col in ("ms", "excess", "ov_static", "ov_grad", "dx_err", "dx_vs_exact_pts"):
            row[col] = statistics.mean(c[col] for c in cells)
        row["excess_max"] = max(c["excess"] for c in cells)
        row["x_exact"] = sum(layer["exact"]["ms"] for layer in per_layer) / sum(c["ms"] for c in cells)
        rows.append(row)
    return rows


def smollm2_gradients(blocks: list[int], batches: int = 2, batch: int = 4, seq_len: int = 128
                      ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """({layer name: W0}, [{layer name: G (tokens, m)} per batch]) for the chosen blocks'
    v/o/up/down of the embedded model, G from the base model's loss on embedded PIQA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from celora_dist.train.data import collate, encode
    from celora_dist.train.embedded import ensure_model, task_records

    folder = ensure_model()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    train, _, _ = task_records("text")
    names = [f"model.layers.{b}.{part}.{proj}" for b in blocks
             for part, proj in (("self_attn", "v_proj"), ("self_attn", "o_proj"), ("mlp", "up_proj"),
                                ("mlp", "down_proj"))]
    grads: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_full_backward_hook(
        lambda mod, gin, gout, n=n: current.__setitem__(n, gout[0].reshape(-1, gout[0].shape[-1]).detach().clone()))
        for n in names]
    for i in range(batches):
        rows = []
        for r in train[i * batch:(i + 1) * batch]:
            ids, start = encode(tok, r["prompt"], r["answer"], seq_len)
            rows.append({"input_ids": ids, "labels": [-100] * start + ids[start:]})
        model.zero_grad(set_to_none=True)
        model(**collate(rows, tok.pad_token_id)).loss.backward()
        grads.append(dict(current))
        current.clear()
    for h in hooks:
        h.remove()
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    return weights, grads


def power_law_weight(m: int, n: int, seed: int) -> torch.Tensor:
    """An m x n weight with singular values (j + 1)^(-ALPHA), random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    S = (torch.arange(r, dtype=torch.float32) + 1) ** -ALPHA
    return (U * S) @ V.T


def synthetic_gradients(m: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of G (tokens, m) sharing log-normal per-feature scales, independent noise."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.randn(m, generator=g).exp()
    return tuple(torch.randn(tokens, m, generator=g) * scale for _ in range(2))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", default="0,10,20,29", help="SmolLM2 blocks (comma list, 'all', or 'none')")
    p.add_argument("--shapes", choices=(*SHAPES, "none"), default="short", help="random real-shaped weights")
    p.add_argument("--tokens", type=int, default=512, help="tokens of the synthetic G")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per SmolLM2 layer (random shapes: 1)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line("cpu", "fp32"), flush=True)
    rows: list[dict] = []
    start = time.perf_counter()
    if args.blocks != "none":
        blocks = list(range(30)) if args.blocks == "all" else [int(b) for b in args.blocks.split(",")]
        weights, (g_sel, g_eval) = smollm2_gradients(blocks)
        for proj in RELEASED_KEEP:
            layers = [study_layer(W, g_sel[n], g_eval[n], RELEASED_KEEP[proj], args.repeats)
                      for n, W in weights.items() if n.endswith(proj)]
            rows += aggregate(f"SmolLM2 {proj} ({tuple(weights[next(n for n in weights if n.endswith(proj))].shape)})",
                              layers)
            print(f"  SmolLM2 {proj}: {len(layers)} layers done ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.shapes != "none":
        for i, (label, m, n) in enumerate(SHAPES[args.shapes]):
            W = power_law_weight(m, n, seed=i)
            G_sel, G_eval = synthetic_gradients(m, args.tokens, seed=100 + i)
            keep = 0.65 if m != n else 0.55
            rows += aggregate(f"random {label} keep {keep}", [study_layer(W, G_sel, G_eval, keep, 1)])
            print(f"  random {label}: done ({time.perf_counter() - start:.0f} s)", flush=True)
    print(markdown_table(rows, COLUMNS, FORMATS))
    return rows


if __name__ == "__main__":
    main()
