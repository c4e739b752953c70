"""Compile the Triton kernels for NVIDIA targets ahead of time, no GPU needed.

The interpreter (interp_kernel_cases.py) checks the numerics but never lowers the
kernels; this catches what only the GPU compiler sees (dot operand shapes and
dtypes, layouts, shared-memory overflow of a tile config) with the ptxas that ships
in the triton wheel. Run by tests/test_kernels.py in a subprocess without
TRITON_INTERPRET, so the kernels are JIT functions here.
"""
from __future__ import annotations

import os

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError("aot_compile_cases.py must run without TRITON_INTERPRET")

from celora_dist.kernels.amm_triton import GPU_CONFIGS, _amm_kernel  # noqa: E402
from celora_dist.kernels.scores_triton import _GPU_BLOCKS, _colsq_kernel  # noqa: E402

H100_SMEM = 232448  # bytes of shared memory per block on sm_90 (227 KiB)
_INTS = ("T", "N", "K1", "K2", "stride_gt", "stride_gm", "stride_wm", "stride_wn", "stride_st",
         "stride_sk", "stride_rk", "stride_rn", "stride_ot", "stride_on", "T_BUCKET", "K_BUCKET")


def _amm_source(dtype: str, config) -> ASTSource:
    """The kernel specialised as a JIT launch on contiguous, 16-byte aligned tensors would be.

    (Triton turns stride-1 ints into constants and marks 16-divisible pointers and
    strides; without that the loads cannot be vectorised or pipelined.)
    """
    ones = ("stride_gm", "stride_wn", "stride_sk", "stride_rn", "stride_on")
    sig = {name: f"*{dtype}" for name in ("g_ptr", "w_ptr", "idx_ptr", "s_ptr", "rs_ptr", "out_ptr")}
    sig["idx_ptr"] = "*i64"
    sig.update({name: ("constexpr" if name in ones else "i32") for name in _INTS})
    flags = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "UPCAST", "DOT_PRECISION")
    sig.update({name: "constexpr" for name in flags})
    names = list(sig)
    aligned = ("g_ptr", "w_ptr", "idx_ptr", "s_ptr", "rs_ptr", "out_ptr", "N", "stride_gt", "stride_wm",
               "stride_rk", "stride_ot")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    constexprs = dict(config.kwargs, UPCAST=False, DOT_PRECISION="ieee", **{name: 1 for name in ones})
    return ASTSource(fn=_amm_kernel, signature=sig, constexprs=constexprs, attrs=attrs)


@pytest.mark.parametrize("arch", [90, 80])
def test_amm_compiles(arch):
    c = GPU_CONFIGS[0]  # the largest tile: the one most likely to break a limit
    kernel = triton.compile(_amm_source("bf16", c), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": c.num_warps, "num_stages": c.num_stages})
    ptx = kernel.asm["ptx"]
    # tensor cores: wgmma on Hopper, mma.sync on Ampere
    assert ("wgmma" in ptx) if arch == 90 else ("mma.sync" in ptx)
    assert 0 < kernel.metadata.shared <= H100_SMEM
    # the gathered W0[I] rows still stream by async copies into pipelined smem stages
    assert "async_copy_global_to_local" in kernel.asm["ttgir"]


def test_scores_compiles():
    sig = {"g_ptr": "*bf16", "part_ptr": "*fp32", "T": "i32", "M": "i32", "stride_gt": "i32",
           "stride_gm": "i32", "rows_per_program": "i32", "BLOCK_T": "constexpr", "BLOCK_M": "constexpr"}
    blocks = {k: v for k, v in _GPU_BLOCKS.items() if k != "ROWS_PER_PROGRAM"}
    kernel = triton.compile(ASTSource(fn=_colsq_kernel, signature=sig, constexprs=blocks),
                            target=GPUTarget("cuda", 90, 32))
    assert "ld.global" in kernel.asm["ptx"]
