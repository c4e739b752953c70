"""Compile the Triton kernels for NVIDIA targets ahead of time, no GPU needed.

The interpreter (interp_kernel_cases.py) checks the numerics but never lowers the
kernels; this catches what only the GPU compiler sees with the ptxas that ships in
the triton wheel: every autotune config that survives ``amm_triton.FITS`` for every
(G, W0) dtype pair and sm_80 / sm_90 must compile without register spills, within
the architecture's shared memory, on tensor cores (wgmma / mma.sync), with both GEMM
operands — the gathered ``[G[:, I] | left]`` buffer and the W0[I] rows — arriving by
16-byte async copies. Run by tests/test_kernels.py in a subprocess without
TRITON_INTERPRET, so the kernels are JIT functions here.

The specialisation compiled is a launch on contiguous tensors with n divisible by 16 and
any T. A T divisible by 16 is a second JIT specialisation; sampled on the six configs
nearest a limit (2026-12-03) it changed one register count (204 -> 226, sm_90 fp32) and no
spill or shared-memory figure, so the matrix does not double for it.

The cases compile in a process pool of 2 (``AOT_WORKERS``), once each per run.
``python tests/aot_compile_cases.py [--all]`` prints the table behind FITS (``--all``:
also the configs it prunes) — how FITS is re-measured after a kernel or Triton change.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import multiprocessing
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import pytest
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError("aot_compile_cases.py must run without TRITON_INTERPRET")

from celora_dist.kernels.amm_triton import (FITS, GPU_CONFIGS, SPECIALISATIONS, _amm_kernel,  # noqa: E402
                                            config_name)
from celora_dist.kernels.scores_triton import _GPU_BLOCKS, _colsq_kernel  # noqa: E402

ARCHS = (80, 90)
# Shared memory per block (opt-in maximum): A100 163 KiB, H100/H200 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_MLIR = {"bf16": "bf16", "fp16": "f16", "fp32": "f32"}
_INTS = ("T", "N", "K1", "K2", "stride_at", "stride_ak", "stride_wm", "stride_wn", "stride_rk", "stride_rn",
         "stride_ot", "stride_on", "T_BUCKET", "K_BUCKET")
_ONES = ("stride_ak", "stride_wn", "stride_rn", "stride_on")
# What the launcher guarantees (padded K1, K2 and A's row stride) or a JIT launch sees for the
# usual hidden sizes (n divisible by 16); Triton specialises 16-divisible ints and pointers.
_ALIGNED = ("a_ptr", "w_ptr", "idx_ptr", "r_ptr", "out_ptr", "N", "K1", "K2", "stride_at", "stride_wm",
            "stride_rk", "stride_ot")


def amm_source(g: str, w: str, config) -> ASTSource:
    """The kernel specialised as a JIT launch from ``launch_amm`` on contiguous tensors would be."""
    sig = {"a_ptr": f"*{g}", "w_ptr": f"*{w}", "idx_ptr": "*i64", "r_ptr": f"*{g}", "out_ptr": f"*{g}"}
    sig.update({name: ("constexpr" if name in _ONES else "i32") for name in _INTS})
    sig.update({name: "constexpr" for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "UPCAST",
                                                "DOT_PRECISION")})
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in _ALIGNED}
    constexprs = dict(config.kwargs, UPCAST=False, DOT_PRECISION="tf32" if g == "fp32" else "ieee",
                      **{name: 1 for name in _ONES})
    return ASTSource(fn=_amm_kernel, signature=sig, constexprs=constexprs, attrs=attrs)


def _ptxas_report(log: str) -> dict:
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    static_smem = re.search(r"(\d+) bytes smem", log)
    assert spills and regs, f"no ptxas -v report in:\n{log}"
    return {"regs": int(regs[1]), "spills": int(spills[1]) + int(spills[2]),
            "static_smem": int(static_smem[1]) if static_smem else 0}


def _tile_loads(ttgir: str, shape: str, dtype: str) -> dict:
    """How the tiles of one shape and dtype are loaded: async copies with their contiguity, and
    any plain ``tt.load`` (a register load: not pipelined through shared memory)."""
    ptr = f"tensor<{shape}x!tt.ptr<{_MLIR[dtype]}>"
    asyncs = [line for line in ttgir.splitlines() if "async_copy_global_to_local" in line and ptr in line]
    plain = [line for line in ttgir.splitlines() if "tt.load" in line and ptr in line]
    widths = sorted({int(m[1]) for line in asyncs for m in [re.search(r"contiguity = (\d+)", line)] if m})
    return {"async": len(asyncs), "plain": len(plain), "vector_bytes": [c * _BYTES[dtype] for c in widths]}


def compile_amm(arch: int, g: str, w: str, index: int) -> dict:
    """Compile config ``index`` for (arch, G dtype, W0 dtype); what the checks need, as plain data."""
    c = GPU_CONFIGS[index]
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed to stdout
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(amm_source(g, w, c), target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": c.num_warps, "num_stages": c.num_stages})
    seconds = time.perf_counter() - start
    report = _ptxas_report(log.getvalue())
    bm, bn, bk = (c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    return dict(report, arch=arch, g=g, w=w, name=config_name(c), seconds=seconds,
                smem=kernel.metadata.shared + report["static_smem"],
                wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync.aligned"),
                wgmma_serialized="C7515" in log.getvalue(),  # ptxas' performance note, not a failure
                a_loads=_tile_loads(ttgir, f"{bm}x{bk}", g),
                w_loads=_tile_loads(ttgir, f"{bk}x{bn}", w),
                r_loads=_tile_loads(ttgir, f"{bk}x{bn}", g),
                cp_async_16=len(re.findall(r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], 0x10", ptx)),
                scalar_global_loads=len(re.findall(r"ld\.global(?!\.v)[.a-z0-9]*", ptx)))


def _compile_star(case):
    return compile_amm(*case)


def compile_all(cases: list[tuple], workers: int) -> list[dict]:
    """Compile ``(arch, g, w, index)`` cases in a pool (fork: no CUDA here, and no re-import),
    into an empty Triton cache: a cache hit would skip ptxas and its report."""
    saved = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="celora-aot-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            if workers <= 1:
                return [compile_amm(*case) for case in cases]
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                return list(pool.map(_compile_star, cases))
        finally:
            if saved is None:
                os.environ.pop("TRITON_CACHE_DIR")
            else:
                os.environ["TRITON_CACHE_DIR"] = saved


def surviving_cases() -> list[tuple]:
    """Every (arch, G dtype, W0 dtype, config index) that FITS lets the autotuner try."""
    return [(arch, g, w, i) for arch, (g, w) in itertools.product(ARCHS, SPECIALISATIONS)
            for i, c in enumerate(GPU_CONFIGS) if config_name(c) in FITS.get((arch, g, w), {})]


_CASES = surviving_cases()


@pytest.fixture(scope="module")
def compiled() -> dict:
    start = time.perf_counter()
    results = compile_all(_CASES, int(os.environ.get("AOT_WORKERS", "2")))
    print(f"\n{len(results)} AOT compiles in {time.perf_counter() - start:.1f} s")
    return {case: r for case, r in zip(_CASES, results)}


def test_fits_covers_every_arch_and_dtype_pair():
    assert set(FITS) == {(arch, g, w) for arch in ARCHS for g, w in SPECIALISATIONS}
    names = {config_name(c) for c in GPU_CONFIGS}
    for key, table in FITS.items():
        assert table and set(table) <= names, key
        assert max(table.values()) <= SMEM_LIMIT[key[0]], key


@pytest.mark.parametrize("case", _CASES, ids=[f"sm{a}-{g}-{w}-{config_name(GPU_CONFIGS[i])}" for a, g, w, i in _CASES])
def test_amm_config_fits(compiled, case):
    r = compiled[case]
    arch, g, w, _ = case
    assert r["spills"] == 0, r
    assert 0 < r["smem"] <= SMEM_LIMIT[arch], r
    assert r["smem"] == FITS[(arch, g, w)][r["name"]], ("FITS is stale: re-measure", r)
    if arch == 90:
        assert r["wgmma"] > 0, r  # Hopper tensor cores
    else:
        assert r["mma_sync"] > 0 and r["wgmma"] == 0, r  # Ampere tensor cores
    # the gathered A buffer, the W0[I] rows and right: pipelined 16-byte async copies only
    for side in ("a_loads", "w_loads", "r_loads"):
        loads = r[side]
        assert loads["async"] > 0 and loads["plain"] == 0 and loads["vector_bytes"] == [16], (side, r)
    assert r["cp_async_16"] > 0 and r["scalar_global_loads"] == 0, r  # in the PTX: cp.async, no register loads


@pytest.mark.parametrize("arch", ARCHS)
def test_scores_compiles(arch):
    sig = {"g_ptr": "*bf16", "part_ptr": "*fp32", "T": "i32", "M": "i32", "stride_gt": "i32",
           "stride_gm": "i32", "rows_per_program": "i32", "BLOCK_T": "constexpr", "BLOCK_M": "constexpr"}
    blocks = {k: v for k, v in _GPU_BLOCKS.items() if k != "ROWS_PER_PROGRAM"}
    kernel = triton.compile(ASTSource(fn=_colsq_kernel, signature=sig, constexprs=blocks),
                            target=GPUTarget("cuda", arch, 32))
    assert "ld.global" in kernel.asm["ptx"]
    assert 0 <= kernel.metadata.shared <= SMEM_LIMIT[arch]


def _table(results: list[dict]) -> str:
    rows = ["| arch | G | W0 | config | regs | spills (B) | smem (KiB) | A / W0 loads | wgmma serialised | "
            "compile (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        loads = "/".join(f"{'async' if r[s]['async'] and not r[s]['plain'] else 'reg'}"
                         f"{r[s]['vector_bytes'] or ''}" for s in ("a_loads", "w_loads"))
        rows.append(f"| sm_{r['arch']} | {r['g']} | {r['w']} | {r['name']} | {r['regs']} | {r['spills']} | "
                    f"{r['smem'] / 1024:.0f} | {loads} | {'yes' if r['wgmma_serialized'] else ''} | "
                    f"{r['seconds']:.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    every = "--all" in sys.argv
    cases = ([(a, g, w, i) for a, (g, w) in itertools.product(ARCHS, SPECIALISATIONS)
              for i in range(len(GPU_CONFIGS))] if every else _CASES)
    start = time.perf_counter()
    results = compile_all(cases, int(os.environ.get("AOT_WORKERS", "2")))
    print(_table(results))
    print(f"{len(results)} compiles in {time.perf_counter() - start:.1f} s")
    fits = {}
    for r in results:
        if r["spills"] == 0 and r["smem"] <= SMEM_LIMIT[r["arch"]]:
            fits.setdefault((r["arch"], r["g"], r["w"]), {})[r["name"]] = r["smem"]
    print("FITS =", fits)
