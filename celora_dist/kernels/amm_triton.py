"""Triton CE-LoRA dX: the contract of :func:`celora_dist.ops.amm.celora_grad_input` in one launch.

    dX = [ G[:, I] | left ] @ [ W0[I, :] ; right ]

torch gathers the left operand ``[G[:, I] | left]`` into ONE contiguous (T, Kp) buffer in
G's dtype, each of its two segments zero-padded to a multiple of ``PAD_K`` (the largest
BLOCK_K), with the index vector padded by a kept row; the kernel then reads it as an
ordinary GEMM operand — no mask along k anywhere — and gathers the W0[I] rows by index as
it loads them (no W0[I] copy: rows are contiguous along n). The second segment is the
small ``left`` (T, r + r0) against ``right`` (zero-padded to (Kp2, n)), which the layer
forms as G @ [s·B | B0_Ī] in the GEMM LoRA needs for dA anyway (docs/design.md §1).

Mixed precision (the dX contract, celora_dist/ops/amm.py): W0 may be fp32 while G is
bf16/fp16 (autocast's fp32 master weights); the kernel loads W0's fp32 rows and casts
each tile to G's dtype in registers, never a full-W0 copy. fp32 G runs on tensor cores
only under TF32 (``torch.backends.cuda.matmul.fp32_precision == "tf32"``); without it,
fp32 goes to the torch path (no tensor cores, and 4-21 s of ptxas per config).

What the GPU compiler makes of it (Triton 3.9, checked ahead of time without a GPU by
tests/aot_compile_cases.py for every surviving config × dtype pair × sm_80/sm_90): the
K-loop is software-pipelined; the A tile ``[G[:, I] | left]``, the W0[I] rows and
``right`` all arrive by 16-byte async copies (``cp.async.cg.shared.global ..., 0x10``)
into shared-memory stages, feeding ``wgmma`` on sm_90 and ``mma.sync`` on sm_80; no
register load from global memory is left. Before (G's columns gathered inside the
kernel, scattered along G's contiguous dimension) the A tile came by 2-byte scalar
register loads outside the pipeline, and 3 of 8 bf16 configs spilled on sm_90 (issue 25)
— none does now. Pre-gathering without the padding compiled to the same scalar loads, because a
mask along an arbitrary k defeats vectorisation. The price is one T×(k + j) gather pass in
torch (the torch path builds the same buffer). With fp32 W0 (mixed pairs) sm_90 keeps one
fp32 W0 stage, converts it through registers, and ptxas reports the wgmma serialised
(C7515). GPU timings are still missing: no GPU was lent to this work.
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


def _config(bm: int, bn: int, bk: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps)


# Tile shapes for the LLaMA projections (hidden 2048/4096, intermediate 8192/14336;
# T = 2k-16k tokens, k = 0.3-1.0 of m). Large 128x256 / 256x128 tiles keep the
# tensor cores fed at these sizes; the 64-wide ones cover small T and small n.
# GROUP_M swizzles tile order so consecutive programs share W0[I] tiles in L2.
# Which of them fit which GPU and dtype: FITS below.
GPU_CONFIGS = [
    _config(128, 256, 64, 3, 8),
    _config(256, 128, 64, 3, 8),
    _config(128, 128, 64, 4, 8),
    _config(128, 128, 32, 4, 4),
    _config(64, 256, 32, 4, 4),
    _config(128, 64, 32, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 3, 4),
]
# Both K segments are padded to a multiple of this, so every config's BLOCK_K divides them.
PAD_K = max(c.kwargs["BLOCK_K"] for c in GPU_CONFIGS)
# The interpreter runs every program instance in numpy: one small tile config, no
# autotune benchmarking (it would need a CPU timer), 16-wide so test shapes still
# span several tiles in T, n and K and exercise every edge mask.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}


@triton.jit
def _amm_kernel(
    a_ptr, w_ptr, idx_ptr, r_ptr, out_ptr,
    T, N, K1, K2,
    stride_at, stride_ak, stride_wm, stride_wn, stride_rk, stride_rn, stride_ot, stride_on,
    T_BUCKET, K_BUCKET,  # autotune keys only (bucketed T and k), unused in the body
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out = A[:, :K1] @ W[idx] + A[:, K1:K1+K2] @ R; K1, K2 multiples of BLOCK_K (padded)."""
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
    col_ok = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past T read row T-1's copy (wrapped) instead of a mask, so the A tile has no
    # mask at all; the store drops them.
    a_ptrs = a_ptr + (rows % T)[:, None] * stride_at + offs_k[None, :] * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # Segment 1: [G[:, I] | 0] @ W0[idx], W0's rows gathered by index at load time.
    for k0 in range(0, K1, BLOCK_K):
        idx = tl.load(idx_ptr + k0 + offs_k).to(tl.int64)
        a = tl.load(a_ptrs)
        b = tl.load(w_ptr + idx[:, None] * stride_wm + cols[None, :] * stride_wn,
                    mask=col_ok[None, :], other=0.0).to(a.dtype)  # fp32 W0 -> G's dtype, in registers
        if UPCAST:  # the interpreter's bf16 dot is wrong upstream; fp32 is exact there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak

    # Segment 2: [left | 0] @ [right ; 0].
    for k0 in range(0, K2, BLOCK_K):
        a = tl.load(a_ptrs)
        b = tl.load(r_ptr + (k0 + offs_k)[:, None] * stride_rk + cols[None, :] * stride_rn,
                    mask=col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak

    tl.store(out_ptr + rows[:, None] * stride_ot + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=(rows < T)[:, None] & col_ok[None, :])


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# (G, W0) dtype pairs the kernel is specialised and AOT-tested for: one dtype throughout, or
# autocast's half-precision G with fp32 master weights. Others run on the torch path.
SPECIALISATIONS = (("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"))

# What fits, measured ahead of time for every config × dtype pair with Triton 3.9.0's bundled
# ptxas (`python tests/aot_compile_cases.py --all`, 2026-12-03; no GPU needed): registers /
# spilled bytes / shared KiB per block; x = pruned (spills, or over A100's 163 KiB / H100's
# 227 KiB of shared memory per block). bf16 and fp16 compile alike, and so do their mixed pairs.
#   sm_80              bf16, fp16   fp32 (TF32)   bf16|fp16 G + fp32 W0
#   128x256x64-s3-w8   242/0/96     254/0/192 x   255/0/96
#   256x128x64-s3-w8   254/0/96     255/512/192 x 255/160/96 x
#   128x128x64-s4-w8   186/0/96     194/0/192 x   187/0/96
#   128x128x32-s4-w4   240/0/48     254/0/96      248/0/48
#   64x256x32-s4-w4    250/0/60     254/0/120     254/0/60
#   128x64x32-s4-w4    158/0/36     168/0/72      161/0/36
#   64x128x64-s4-w4    164/0/72     204/0/144     168/0/72
#   64x64x64-s3-w4     128/0/32     148/0/64      128/0/32
#   sm_90
#   128x256x64-s3-w8   188/0/144    216/0/288 x   224/0/144
#   256x128x64-s3-w8   197/0/144    254/0/288 x   201/0/144
#   128x128x64-s4-w8   118/0/128    150/0/256 x   128/0/128
#   128x128x32-s4-w4   184/0/64     218/0/128     193/0/64
#   64x256x32-s4-w4    180/0/80     204/0/160     219/0/80
#   128x64x32-s4-w4    112/0/48     142/0/96      114/0/48
#   64x128x64-s4-w4    118/0/96     143/0/192     134/0/96
#   64x64x64-s3-w4     84/0/48      116/0/96      92/0/48
# The mixed pairs on sm_90 keep one fp32 W0 stage and convert it through registers, and ptxas
# reports their wgmma serialised (C7515): likely slower per FLOP than bf16 W0 (unmeasured, no GPU).
# FITS maps (arch, G dtype, W0 dtype) to the surviving configs and their shared bytes (the
# autotuner drops those over the device's own limit, e.g. 99 KiB on sm_86/89).
_KIB = 1024
_SM80_HALF = {"128x256x64-s3-w8": 96 * _KIB, "256x128x64-s3-w8": 96 * _KIB, "128x128x64-s4-w8": 96 * _KIB,
              "128x128x32-s4-w4": 48 * _KIB, "64x256x32-s4-w4": 60 * _KIB, "128x64x32-s4-w4": 36 * _KIB,
              "64x128x64-s4-w4": 72 * _KIB, "64x64x64-s3-w4": 32 * _KIB}
_SM90_HALF = {"128x256x64-s3-w8": 144 * _KIB, "256x128x64-s3-w8": 144 * _KIB, "128x128x64-s4-w8": 128 * _KIB,
              "128x128x32-s4-w4": 64 * _KIB, "64x256x32-s4-w4": 80 * _KIB, "128x64x32-s4-w4": 48 * _KIB,
              "64x128x64-s4-w4": 96 * _KIB, "64x64x64-s3-w4": 48 * _KIB}
_SM80_TF32 = {"128x128x32-s4-w4": 96 * _KIB, "64x256x32-s4-w4": 120 * _KIB, "128x64x32-s4-w4": 72 * _KIB,
              "64x128x64-s4-w4": 144 * _KIB, "64x64x64-s3-w4": 64 * _KIB}
_SM90_TF32 = {"128x128x32-s4-w4": 128 * _KIB, "64x256x32-s4-w4": 160 * _KIB, "128x64x32-s4-w4": 96 * _KIB,
              "64x128x64-s4-w4": 192 * _KIB, "64x64x64-s3-w4": 96 * _KIB}
_SM80_MIXED = {name: b for name, b in _SM80_HALF.items() if name != "256x128x64-s3-w8"}  # spills 160 B
FITS = {
    (80, "bf16", "bf16"): _SM80_HALF, (80, "fp16", "fp16"): _SM80_HALF, (80, "fp32", "fp32"): _SM80_TF32,
    (80, "bf16", "fp32"): _SM80_MIXED, (80, "fp16", "fp32"): _SM80_MIXED,
    (90, "bf16", "bf16"): _SM90_HALF, (90, "fp16", "fp16"): _SM90_HALF, (90, "fp32", "fp32"): _SM90_TF32,
    (90, "bf16", "fp32"): _SM90_HALF, (90, "fp16", "fp32"): _SM90_HALF,
}


def config_name(config: triton.Config) -> str:
    """``BMxBNxBK-sS-wW``: the key of a config in FITS and in the AOT test's ids."""
    kw = config.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}-s{config.num_stages}-w{config.num_warps}"


def _table_arch(capability: tuple[int, int]) -> int:
    """Hopper uses its own (wgmma) table; every other arch the Ampere (mma.sync) one, whose
    entries are further filtered by the device's shared memory (sm_86/89/120: 99 KiB)."""
    return 90 if capability[0] == 9 else 80


def configs_for(configs: list, capability: tuple[int, int], smem_limit: int, g_dtype: torch.dtype,
                w_dtype: torch.dtype) -> list:
    """The configs FITS lists for this architecture and (G, W0) dtypes whose shared memory fits
    ``smem_limit`` bytes; never empty (else the smallest tile, which fits everywhere measured)."""
    table = FITS.get((_table_arch(capability), _DTYPE_NAMES.get(g_dtype), _DTYPE_NAMES.get(w_dtype)), {})
    kept = [c for c in configs if table.get(config_name(c), smem_limit + 1) <= smem_limit]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]


def fitting_configs(configs: list, named_args: dict, **kwargs) -> list:
    """The autotuner's ``early_config_prune``: :func:`configs_for` this launch's device and dtypes."""
    a = named_args["a_ptr"]
    device = a.device.index if a.device.index is not None else torch.cuda.current_device()
    smem_limit = triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"]
    return configs_for(configs, torch.cuda.get_device_capability(device), smem_limit, a.dtype,
                       named_args["w_ptr"].dtype)


# T and k are bucketed to powers of two so a new token count or keep ratio reuses the
# tuned config of its bucket instead of re-benchmarking (the in-between heuristic);
# the autotuner adds the tensors' dtypes to the key itself.
_amm_kernel_tuned = triton.autotune(configs=GPU_CONFIGS, key=["T_BUCKET", "N", "K_BUCKET"],
                                    prune_configs_by={"early_config_prune": fitting_configs})(_amm_kernel)


def tf32_enabled(matmul=None) -> bool:
    """torch's TF32 switch for fp32 matmuls, read without raising.

    torch >= 2.9 has ``fp32_precision`` ("tf32" / "ieee"; "none" while unset = torch's ieee
    default); once ``torch.backends.fp32_precision = "tf32"`` is set (transformers' tf32=True),
    reading the legacy ``allow_tf32`` raises (torch 2.13), so that is only the fallback for
    older torch. ``matmul``: the ``torch.backends.cuda.matmul`` object (tests pass stand-ins).
    """
    matmul = torch.backends.cuda.matmul if matmul is None else matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # mixed legacy/new settings: torch refuses to say; ieee is the safe read
        return False


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 switch so the kernel matches cuBLAS' numerics."""
    return "tf32" if dtype == torch.float32 and tf32_enabled() else "ieee"


def kernel_supports(g_dtype: torch.dtype, w_dtype: torch.dtype) -> bool:
    """Whether the kernel runs this (G, W0) dtype pair; else the torch path does.

    fp32 G without TF32 never runs here: no tensor cores (the kernel would be slower than
    cuBLAS' fp32 GEMM) and ptxas takes 4-21 s per config. The interpreter keeps fp32 (ieee),
    the exact path the numerics tests compare against fp64.
    """
    pair = (_DTYPE_NAMES.get(g_dtype), _DTYPE_NAMES.get(w_dtype))
    if pair not in SPECIALISATIONS:
        return False
    return g_dtype != torch.float32 or INTERPRET or tf32_enabled()


def _padded(k: int) -> int:
    return -(-k // PAD_K) * PAD_K


def gathered_operands(G: Tensor, idx: Tensor, S: Tensor | None, Rs: Tensor | None):
    """``(A, idx_p, R, K1, K2)``: A = [G[:, idx] | 0 | S | 0] (T, K1 + K2) in G's dtype, idx
    padded to K1 with its first (kept) row, R = [Rs ; 0] (K2, n); K1, K2 multiples of PAD_K.

    The zero columns of A meet a kept row of W0 (finite wherever the result is) and the zero
    rows of R, so neither side needs a mask along k.
    """
    T, k = G.shape[0], idx.numel()
    j = 0 if S is None else S.shape[1]
    K1, K2 = _padded(k), _padded(j)
    idx = idx.long()  # torch.gather takes int64 only
    A = G.new_empty(T, K1 + K2)
    torch.gather(G, 1, idx.expand(T, k), out=A[:, :k])
    A[:, k:K1].zero_()
    idx_p = idx.new_empty(K1)
    idx_p[:k] = idx
    if K1 > k:
        idx_p[k:] = idx[:1]  # a tensor, not idx[0].item(): no host sync
    R = None
    if j:
        A[:, K1:K1 + j].copy_(S)
        A[:, K1 + j:].zero_()
        R = G.new_zeros(K2, Rs.shape[1])
        R[:j].copy_(Rs)
    return A, idx_p, R, K1, K2


def launch_amm(G: Tensor, W: Tensor, idx: Tensor, S: Tensor | None, Rs: Tensor | None,
               config: dict | None = None) -> Tensor:
    """One launch of ``G[:, idx] @ W[idx] + S @ Rs`` (S, Rs optional), output in G's dtype;
    W (any float dtype) is cast to G's dtype tile by tile, S and Rs while they are padded.

    ``config``: fixed tile sizes (tests); default autotuned on GPU, INTERPRET_CONFIG
    under the interpreter.
    """
    T, N = G.shape[0], W.shape[1]
    out = torch.empty((T, N), dtype=G.dtype, device=G.device)
    if T == 0 or N == 0:
        return out
    A, idx_p, R, K1, K2 = gathered_operands(G, idx, S, Rs)
    if K1 + K2 == 0:
        return out.zero_()
    if R is None:
        R = A  # never read: K2 = 0
    args = (A, W, idx_p, R, out, T, N, K1, K2,
            A.stride(0), A.stride(1), W.stride(0), W.stride(1), R.stride(0), R.stride(1),
            out.stride(0), out.stride(1),
            triton.next_power_of_2(T), triton.next_power_of_2(K1 + K2))
    flags = {"UPCAST": INTERPRET and G.dtype == torch.bfloat16,
             "DOT_PRECISION": "ieee" if INTERPRET else dot_precision(G.dtype)}
    if config is None and not INTERPRET:
        def grid(meta):
            return (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _amm_kernel_tuned[grid](*args, **flags)
        return out
    cfg = dict(INTERPRET_CONFIG if config is None else config)
    if PAD_K % cfg["BLOCK_K"]:
        raise ValueError(f"launch_amm: BLOCK_K {cfg['BLOCK_K']} must divide PAD_K {PAD_K}")
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
    So do dtype pairs the kernel does not run (:func:`kernel_supports`: fp32 without TF32).
    """
    check_grad_input_shapes(grad_output, weight, left, right)
    if selected is None or not kernel_supports(grad_output.dtype, weight.dtype):
        return _reference_grad_input(grad_output, weight, selected, left, right)
    return launch_amm(grad_output, weight, selected, left, right)
