"""LM-head backward: exact dense dH = G @ W_head vs the vocab-sparse top-k backward.

    python bench/head_backward.py                      # CPU, scaled token counts
    python bench/head_backward.py --device cuda --dtype bf16 --tokens 4096

For each vocabulary shape (SmolLM2 49K×576, LLaMA-3.2-1B 128K×2048, Gemma 256K×2304)
and head_keep, times the dense product and the full sparse backward step (score the
columns of G, top-k, gathered GEMM), interleaved in one run, median of repeats, and
prints the speed-up next to its FLOP ceiling V / k (the score pass is O(T·V), 1/d of
the dense product, and is counted in the measured time, not in the ceiling). Also the
relative error of the approximation on a synthetic softmax − one-hot gradient.
"""
from __future__ import annotations

import argparse

import torch
from _common import interleaved_medians, machine_line, markdown_table

from celora_dist.config import num_kept  # noqa: E402
from celora_dist.kernels import grad_input  # noqa: E402
from celora_dist.ops.amm import gradient_scores  # noqa: E402
from celora_dist.selection import topk_indices  # noqa: E402

SHAPES = {"smollm2-135m": (49152, 576), "llama-3.2-1b": (128256, 2048), "gemma-2b": (256000, 2304)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def logit_gradient(tokens: int, vocab: int, dtype, device, seed: int = 0) -> torch.Tensor:
    """softmax − one-hot of Zipf-ish logits: the heavy-tailed shape of a real LM's G.

    Drawn on ``device``: at T = 4096 the Gemma head's logits are 1e9 fp32 numbers (4 GB),
    which a CPU generator would make and copy over for every shape of the CUDA run."""
    g = torch.Generator(device=device).manual_seed(seed)
    rank_bias = -1.1 * torch.log1p(torch.arange(vocab, dtype=torch.float32, device=device))
    logits = rank_bias[torch.randperm(vocab, generator=g, device=device)]
    logits = logits + 2.0 * torch.randn(tokens, vocab, generator=g, device=device)
    G = torch.softmax(logits, dim=-1)
    del logits
    G[torch.arange(tokens, device=device),
      torch.randint(0, vocab // 20, (tokens,), generator=g, device=device)] -= 1.0
    return (G / tokens).to(dtype)


def sparse_backward(G: torch.Tensor, W: torch.Tensor, w_row_sq: torch.Tensor, k: int) -> torch.Tensor:
    return grad_input(G, W, topk_indices(gradient_scores(G) * w_row_sq, k))


def run(shapes: list[str], keeps: list[float], tokens: int, dtype: str, device: str, repeats: int) -> list[dict]:
    """All rows; each shape's rows are printed (after the header) as soon as it is measured,
    so a run cut off by a time limit keeps the shapes it finished."""
    rows = []
    dt = DTYPES[dtype]
    print(markdown_table([], COLUMNS, FORMATS), flush=True)
    for shape in shapes:
        vocab, hidden = SHAPES[shape]
        g = torch.Generator(device=device).manual_seed(1)
        W = (torch.randn(vocab, hidden, generator=g, device=device) * hidden ** -0.5).to(dt)
        w_row_sq = W.float().pow(2).sum(1)
        G = logit_gradient(tokens, vocab, dt, device)
        exact = (G.float() @ W.float())
        cases = {"dense": lambda: G @ W}
        for keep in keeps:
            k = num_kept(keep, vocab)
            cases[keep] = (lambda k=k: sparse_backward(G, W, w_row_sq, k))
        med = interleaved_medians(cases, repeats, device)
        dense = med["dense"]
        shape_rows = []
        for keep in keeps:
            k = num_kept(keep, vocab)
            approx = sparse_backward(G, W, w_row_sq, k).float()
            t = med[keep]
            ceiling = vocab / k
            shape_rows.append({
                "shape": shape, "V": vocab, "d": hidden, "T": tokens, "keep": keep, "k": k,
                "dense_ms": 1e3 * dense, "sparse_ms": 1e3 * t, "speedup": dense / t,
                "ceiling": ceiling, "of_ceiling": (dense / t) / ceiling,
                "rel_err": float((approx - exact).norm() / exact.norm()),
            })
        print("\n".join(markdown_table(shape_rows, COLUMNS, FORMATS).splitlines()[2:]), flush=True)
        rows += shape_rows
        del G, W, w_row_sq, exact, cases  # the next shape's G and W (up to 6 GB) need the room
    return rows


COLUMNS = ["shape", "V", "d", "T", "keep", "k", "dense_ms", "sparse_ms", "speedup", "ceiling", "of_ceiling", "rel_err"]


FORMATS = {"keep": "{:.2f}", "dense_ms": "{:.1f}", "sparse_ms": "{:.1f}", "speedup": "{:.2f}x",
           "ceiling": "{:.1f}x", "of_ceiling": "{:.0%}", "rel_err": "{:.3f}"}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--tokens", type=int, default=None, help="T (default 256 on CPU, 4096 on CUDA)")
    p.add_argument("--keeps", default="0.05,0.1,0.2")
    p.add_argument("--shapes", default=None, help=f"comma list of {list(SHAPES)} (CPU default: smollm2-135m)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny run for the test suite")
    a = p.parse_args(argv)
    if a.smoke:
        SHAPES["smoke"] = (512, 32)
        shapes, tokens, repeats = ["smoke"], 16, 2
    else:
        default_shapes = "smollm2-135m" if a.device == "cpu" else ",".join(SHAPES)
        shapes = (a.shapes or default_shapes).split(",")
        tokens, repeats = a.tokens or (256 if a.device == "cpu" else 4096), a.repeats
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    keeps = [float(k) for k in a.keeps.split(",")]
    print(f"LM-head backward, {machine_line(a.device, a.dtype)}", flush=True)
    return run(shapes, keeps, tokens, a.dtype, a.device, repeats)


if __name__ == "__main__":
    main()
