"""Reference for the CE-LoRA activation gradient (docs/design.md §1) — the one contract of the dX op.

    dX = G[:, I] @ W0[I, :]  +  left @ right

with I the kept output features (sorted; ``selected=None`` means every feature, the
dense ``G @ W0``) and (left, right) an optional low-rank term added exactly. This is
the call every caller makes, with the same arguments on every backend:

- a CE-LoRA layer (``celora_dist/layer.py``) passes ``left = G @ [s·B | B0_Ī]`` and
  ``right = [A ; A0]``, where B0_Ī is B0 with the kept rows zeroed, so
  ``left @ right = s·(G B) A + (G[:, Ī] B0[Ī]) A0`` — LoRA's term plus the double-LoRA
  term of the residual split; together with the gathered product this is
  ``G[:, I] Ws[I] + G B0 A0 + s·(G B) A`` without ever forming Ws = W0 − B0 A0;
- an exact layer passes ``selected=None`` and LoRA's (s·G B, A);
- the vocab-sparse LM head passes neither low-rank factor.

Mixed precision: W0, left and right may come in another float dtype than G (fp32 master
weights with a bf16/fp16 G under autocast, ``celora_dist/precision.py``). The result is
in G's dtype and they enter as if cast to it — only the gathered rows of W0 are cast,
never a full copy of W0 on the approximate path; GEMMs accumulate in fp32.

The Triton kernel (``celora_dist/kernels/amm_triton.py``), its tests and
``bench/layer_backward.py`` implement and time exactly this signature.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor


def check_grad_input_shapes(grad_output: Tensor, weight: Tensor, left: Tensor | None = None,
                            right: Tensor | None = None) -> None:
    """Raise unless (T, m) @ (m, n) [+ (T, j) @ (j, n)] chains; shared by every dX implementation."""
    if grad_output.dim() != 2 or weight.dim() != 2 or grad_output.shape[1] != weight.shape[0]:
        raise ValueError(
            f"celora_grad_input: grad_output {tuple(grad_output.shape)} and weight "
            f"{tuple(weight.shape)} do not chain as (T, m) @ (m, n)"
        )
    if (left is None) != (right is None):
        raise ValueError("celora_grad_input: give both left and right (the low-rank term) or neither")
    if left is not None and (left.dim() != 2 or right.dim() != 2 or left.shape[0] != grad_output.shape[0]
                             or left.shape[1] != right.shape[0] or right.shape[1] != weight.shape[1]):
        raise ValueError(
            f"celora_grad_input: left {tuple(left.shape)} @ right {tuple(right.shape)} does not give a "
            f"({grad_output.shape[0]}, {weight.shape[1]}) term"
        )


def celora_grad_input(
    grad_output: Tensor,
    weight: Tensor,
    selected: Tensor | None = None,
    left: Tensor | None = None,
    right: Tensor | None = None,
) -> Tensor:
    """``G[:, I] @ W0[I] + left @ right`` for a (T, m) gradient G and an (m, n) weight W0.

    selected: sorted integer tensor of kept output features, or None (dense ``G @ W0``).
    left (T, j), right (j, n): the low-rank term, or both None.
    Matmuls run in G's dtype (W0, left, right of another dtype are cast to it, see the module
    docstring); torch accumulates bf16/fp16 GEMMs in fp32.
    """
    check_grad_input_shapes(grad_output, weight, left, right)
    dtype = grad_output.dtype
    if left is not None:
        left, right = _as(left, dtype), _as(right, dtype)
    if selected is None:
        out = grad_output @ _as(weight, dtype)
        return out if left is None else out.addmm_(left, right)
    selected = selected.long()  # torch.gather takes int64 only (the layer's indices already are)
    if grad_output.device.type == "cpu" and torch.get_num_threads() == 1:
        return _gathered_then_added(grad_output, weight, selected, left, right)
    return _one_gemm_over_gathered_buffers(grad_output, weight, selected, left, right)


def _one_gemm_over_gathered_buffers(G: Tensor, W: Tensor, selected: Tensor, left: Tensor | None,
                                    right: Tensor | None) -> Tensor:
    """``[G_I | left] @ [W0_I ; right]``: ONE GEMM, its operands gathered straight into their buffers.

    No output pass of an ``addmm_`` (memory-bound: it re-reads and re-writes (T, n)) and one
    rounding. ``torch.gather`` writes the column slice on TensorIterator's strided path and runs
    on every thread; ``index_select`` along dim 1 is a serial loop, and into a slice it falls
    off its fast path (2-5x slower). fp32, T = 2048, keep 0.55, 2 threads (Intel Xeon, 2026-12-02,
    interleaved medians of 21): faster than :func:`_gathered_then_added` on each of the eight
    8B/4 and 1B/4 projection shapes, by 0.1-6% of the dense time, e.g. (m, n) = (512, 2048)
    1.50x -> 1.58x over dense; the LM head's gather (512, 49152) -> 4916 columns: 12.3 -> 6.5 ms.
    Without a low-rank term (the head) the buffers are just the gathered operands.
    """
    T, k, j = G.shape[0], selected.numel(), 0 if left is None else left.shape[1]
    lhs, rhs = G.new_empty(T, k + j), G.new_empty(k + j, W.shape[1])
    torch.gather(G, 1, selected.expand(T, k), out=lhs[:, :k])
    if W.dtype == G.dtype:
        torch.index_select(W, 0, selected, out=rhs[:k])
    else:  # fp32 master weight: only the k gathered rows are cast
        rhs[:k].copy_(W.index_select(0, selected))
    if j:
        lhs[:, k:].copy_(left)
        rhs[k:].copy_(right)
    return lhs @ rhs


def _gathered_then_added(G: Tensor, W: Tensor, selected: Tensor, left: Tensor | None,
                         right: Tensor | None) -> Tensor:
    """``(G_I @ W0_I) + left @ right`` on one CPU thread, where ``index_select``'s serial loop
    gathers G twice as fast as ``torch.gather`` (1 thread: 1.1 vs 2.0 ms for (2048, 2048) ->
    1127 columns), so :func:`_one_gemm_over_gathered_buffers` lost up to 9% ((1024, 1024)
    1.60x -> 1.47x over dense).

    fp32 adds the small term with one ``addmm_`` instead of copying the gathered operands into
    cat'ed buffers (1 core, (T, m, n) = (2048, 3584, 1024): 1.44x -> 1.53x over dense, ceiling
    1.79x); half precision keeps the single GEMM, as an intermediate bf16/fp16 output would
    add a coarse rounding.
    """
    G_I, W_I = G.index_select(1, selected), _as(W.index_select(0, selected), G.dtype)
    if left is None:
        return G_I @ W_I
    if G.dtype == torch.float32:
        return (G_I @ W_I).addmm_(left, right)
    return torch.cat([G_I, left], dim=1) @ torch.cat([W_I, right], dim=0)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


_SCORE_BLOCK_ELEMS = 1 << 19  # fp32 elements per row block of a CPU column reduction (2 MiB)


def fp32_row_blocks(G: Tensor) -> Iterator[Tensor]:
    """G's rows in fp32: cache-sized blocks (~2 MiB) on CPU, the whole G in one block elsewhere.

    Column reductions over a (T, m) gradient run block by block on CPU so their fp32 temporaries
    stay cache-resident (gradient_scores below: 74 -> 8 ms on the LM head's (512, 49152) G)."""
    T, m = G.shape
    rows = max(1, T) if G.device.type != "cpu" else max(1, _SCORE_BLOCK_ELEMS // max(m, 1))
    for start in range(0, T, rows):
        yield G[start:start + rows].float()


def gradient_scores(grad_output: Tensor) -> Tensor:
    """Per-output-feature squared column norms ‖G[:, i]‖² of a (T, m) gradient, in fp32.

    Squared norms add across micro-batches and data-parallel ranks; the score of
    feature i is then colsq_i · ‖Ws[i, :]‖² (the square of docs/design.md §1's score).
    Row blocks bound the squared temporary to ~2 MiB (cache-resident): for the LM
    head's (512, 49152) logit gradient on CPU that took the pass from 74 ms to 8 ms
    (the one-shot ``(g * g).sum(0)`` wrote and re-read a 100 MB temporary).
    """
    out = torch.zeros(grad_output.shape[1], dtype=torch.float32, device=grad_output.device)
    for g in fp32_row_blocks(grad_output):  # one launch on accelerators; cache-sized row blocks on CPU
        out += (g * g).sum(dim=0)
    return out
