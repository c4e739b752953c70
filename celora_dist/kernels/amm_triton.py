"""Triton CE-LoRA dX: the contract of :func:`celora_dist.ops.amm.celora_grad_input` in one launch.

    dX = [ G[:, I] | left ] @ [ W0[I, :] ; right ]

The kernel walks two K-segments into one fp32 accumulator: the first gathers
columns I of G and rows I of W0 by index as it loads them (no W0[I] copy, no
G[:, I] copy); the second is the small (T, r + r0) ``left`` operand against
(r + r0, n) ``right``, which the layer forms as G @ [s·B | B0_Ī] in the GEMM LoRA
needs for dA anyway (docs/design.md §1, "As built").

What the GPU compiler makes of it (Triton 3.9, sm_90, bf16, 128x256x64 tile; checked
ahead of time without a GPU by tests/aot_compile_cases.py): the K-loop is software-
pipelined, the W0[I] rows and the indices arrive by 16-byte async copies into 3 shared-
memory stages, and the G[:, I] tile is gathered with 2-byte register loads (its
columns are scattered along G's contiguous dimension, so they cannot be vectorised).
Pre-gathering G[:, I] with torch was tried and compiled to the same scalar loads (the
tile mask along an arbitrary k defeats vectorisation), so it would only add a T×k
copy. GPU timings are still missing: no GPU was lent to this work.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops.amm import celora_grad_input as _reference_grad_input
from ..ops.amm import check_grad_input_shapes

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tile shapes for the LLaMA projections (hidden 2048/4096, intermediate 8192/14336;
# T = 2k-16k tokens, k = 0.3-1.0 of m). Large 128x256 / 256x128 tiles keep the
# tensor cores fed at these sizes; the 64-wide ones cover small T and small n.
# GROUP_M swizzles tile order so consecutive programs share W0[I] tiles in L2.
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=4),
]
# The interpreter runs every program instance in numpy: one small tile config, no
# autotune benchmarking (it would need a CPU timer), 16-wide so test shapes still
# span several tiles in T, n and K and exercise every edge mask.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}


@triton.jit
def _amm_kernel(
    g_ptr, w_ptr, idx_ptr, s_ptr, rs_ptr, out_ptr,
    T, N, K1, K2,
    stride_gt, stride_gm, stride_wm, stride_wn,
    stride_st, stride_sk, stride_rk, stride_rn,
    stride_ot, stride_on,
    T_BUCKET, K_BUCKET,  # autotune keys only (bucketed T and k), unused in the body
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(T, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < T
    col_ok = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # Segment 1: G[:, I] @ W0[I, :], gathered by index at load time.
    for k0 in range(0, K1, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K1
        idx = tl.load(idx_ptr + kk, mask=k_ok, other=0).to(tl.int64)
        a = tl.load(g_ptr + rows[:, None] * stride_gt + idx[None, :] * stride_gm,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + idx[:, None] * stride_wm + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong upstream; fp32 is exact there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # Segment 2: the small (T, r0 + r) operand against [A0 ; R].
    for k0 in range(0, K2, BLOCK_K):
        kk = (k0 + offs_k).to(tl.int64)
        k_ok = kk < K2
        a = tl.load(s_ptr + rows[:, None] * stride_st + kk[None, :] * stride_sk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(rs_ptr + kk[:, None] * stride_rk + cols[None, :] * stride_rn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    tl.store(out_ptr + rows[:, None] * stride_ot + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# T and k are bucketed to powers of two so a new token count or keep ratio reuses the
# tuned config of its bucket instead of re-benchmarking (the in-between heuristic).
_amm_kernel_tuned = triton.autotune(configs=GPU_CONFIGS, key=["T_BUCKET", "N", "K_BUCKET"])(_amm_kernel)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 switch so the kernel matches cuBLAS' numerics."""
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def launch_amm(G: Tensor, W: Tensor, idx: Tensor, S: Tensor | None, Rs: Tensor | None,
               config: dict | None = None) -> Tensor:
    """One launch of ``G[:, idx] @ W[idx] + S @ Rs`` (S, Rs optional), output in G's dtype.

    ``config``: fixed tile sizes (tests); default autotuned on GPU, INTERPRET_CONFIG
    under the interpreter.
    """
    T, N = G.shape[0], W.shape[1]
    out = torch.empty((T, N), dtype=G.dtype, device=G.device)
    if T == 0 or N == 0:
        return out
    idx = idx.contiguous()
    if S is None:
        S, Rs = G, W  # never read: K2 = 0
        K2 = 0
    else:
        K2 = S.shape[1]
    args = (G, W, idx, S, Rs, out, T, N, idx.numel(), K2,
            G.stride(0), G.stride(1), W.stride(0), W.stride(1),
            S.stride(0), S.stride(1), Rs.stride(0), Rs.stride(1),
            out.stride(0), out.stride(1),
            triton.next_power_of_2(T), triton.next_power_of_2(max(idx.numel(), 1)))
    flags = {"UPCAST": INTERPRET, "DOT_PRECISION": _dot_precision(G.dtype)}
    if config is None and not INTERPRET:
        def grid(meta):
            return (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _amm_kernel_tuned[grid](*args, **flags)
        return out
    cfg = dict(INTERPRET_CONFIG if config is None else config)
    launch_opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    grid = (triton.cdiv(T, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _amm_kernel[grid](*args, **cfg, **flags, **launch_opts)
    return out


def celora_grad_input_triton(
    grad_output: Tensor,
    weight: Tensor,
    selected: Tensor | None = None,
    left: Tensor | None = None,
    right: Tensor | None = None,
) -> Tensor:
    """CE-LoRA dX; same contract as :func:`celora_dist.ops.amm.celora_grad_input`.

    ``selected=None`` (exact) takes the dense torch path: with nothing to gather,
    cuBLAS' dense GEMM is the faster kernel, so keep 1.0 is never slower than dense.
    """
    check_grad_input_shapes(grad_output, weight, left, right)
    if selected is None:
        return _reference_grad_input(grad_output, weight, None, left, right)
    if left is not None:
        left, right = left.to(grad_output.dtype), right.to(grad_output.dtype)
    return launch_amm(grad_output, weight, selected, left, right)
