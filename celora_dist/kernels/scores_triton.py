"""Triton refresh-step scores: squared column norms ‖G[:, i]‖² of a (T, m) gradient, fp32.

Same contract as :func:`celora_dist.ops.amm.gradient_scores`. The torch version
materialises an fp32 copy of G and its square (two T×m temporaries, 8·T·m bytes
each for bf16 input); this kernel reads G once. The grid splits T as well as m
(m/BLOCK_M alone is only 16-112 programs at LLaMA widths, too few to fill a GPU);
the per-split partial sums are added by torch afterwards instead of with atomics,
so the result is deterministic and ranks that all-reduce it select the same I.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# GPU: 128-wide column blocks (coalesced 256 B rows in bf16), 64-row steps, and at
# most ~1024 rows per program. Interpreter: small blocks so tests span several.
_GPU_BLOCKS = {"BLOCK_T": 64, "BLOCK_M": 128, "ROWS_PER_PROGRAM": 1024}
_INTERPRET_BLOCKS = {"BLOCK_T": 16, "BLOCK_M": 16, "ROWS_PER_PROGRAM": 32}


@triton.jit
def _colsq_kernel(g_ptr, part_ptr, T, M, stride_gt, stride_gm, rows_per_program,
                  BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    cols = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col_ok = cols < M
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    start = pid_t * rows_per_program
    for t0 in range(0, rows_per_program, BLOCK_T):
        rows = (start + t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        g = tl.load(g_ptr + rows[:, None] * stride_gt + cols[None, :] * stride_gm,
                    mask=(rows < T)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(g * g, axis=0)
    tl.store(part_ptr + pid_t * M + cols, acc, mask=col_ok)


def gradient_scores_triton(grad_output: Tensor) -> Tensor:
    """Per-output-feature ‖G[:, i]‖² in fp32 for a (T, m) gradient of any float dtype/strides."""
    if grad_output.dim() != 2:
        raise ValueError(f"gradient_scores: expected a (T, m) gradient, got {tuple(grad_output.shape)}")
    T, M = grad_output.shape
    if T == 0 or M == 0:
        return torch.zeros(M, dtype=torch.float32, device=grad_output.device)
    blocks = _INTERPRET_BLOCKS if INTERPRET else _GPU_BLOCKS
    rows_per_program = blocks["ROWS_PER_PROGRAM"]
    splits = triton.cdiv(T, rows_per_program)
    partial = torch.empty((splits, M), dtype=torch.float32, device=grad_output.device)
    grid = (triton.cdiv(M, blocks["BLOCK_M"]), splits)
    _colsq_kernel[grid](grad_output, partial, T, M, grad_output.stride(0), grad_output.stride(1),
                        rows_per_program, BLOCK_T=blocks["BLOCK_T"], BLOCK_M=blocks["BLOCK_M"])
    return partial.sum(dim=0) if splits > 1 else partial[0]
