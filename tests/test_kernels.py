"""Triton kernels: host-side choices here, kernel cases in subprocesses (interpreter numerics, AOT compilation).

- tests/interp_kernel_cases.py: TRITON_INTERPRET=1 has to be in the environment before
  triton is first imported, and this pytest process has imported triton already (peft
  does); so the cases run in a fresh interpreter with the variable set.
- tests/aot_compile_cases.py: compiles every surviving autotune config × dtype pair for
  sm_80 / sm_90 without a GPU, without the interpreter, into a fresh cache so every run
  really compiles.
Every case must pass: a skip or an error fails the test, and the count guards against
cases silently not being collected.
The tests in this file never launch a kernel: the TF32 read, the dtype routing, the
autotune pruning and the padded operands are host code.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from celora_dist.kernels import amm_triton
from celora_dist.ops.amm import celora_grad_input

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fp32_precision():
    """Set torch's global fp32 precision ("tf32" / "ieee") for one test, restored afterwards."""
    saved = (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision)

    def set_to(value: str) -> None:
        torch.backends.fp32_precision = value

    yield set_to
    torch.backends.fp32_precision = saved[0]
    torch.backends.cuda.matmul.fp32_precision = saved[1]
    torch.backends.cuda.matmul.allow_tf32  # noqa: B018 -- readable again: no mixed-API state left behind


def test_tf32_state_through_the_new_api(fp32_precision):
    """transformers' tf32=True sets the global flag; the old allow_tf32 then raises on read."""
    fp32_precision("tf32")
    with pytest.raises(RuntimeError):
        torch.backends.cuda.matmul.allow_tf32  # noqa: B018 -- the read the kernel must not make
    assert amm_triton.tf32_enabled()
    assert amm_triton.dot_precision(torch.float32) == "tf32"
    assert amm_triton.dot_precision(torch.bfloat16) == "ieee"  # not an fp32 dot: no TF32 question
    assert amm_triton.kernel_supports(torch.float32, torch.float32)
    fp32_precision("ieee")
    assert not amm_triton.tf32_enabled()
    assert amm_triton.dot_precision(torch.float32) == "ieee"
    assert not amm_triton.kernel_supports(torch.float32, torch.float32)


def test_tf32_state_on_older_torch():
    """Without ``fp32_precision`` (torch < 2.9), or while it is unset, the legacy flag decides."""
    assert amm_triton.tf32_enabled(SimpleNamespace(allow_tf32=True))
    assert not amm_triton.tf32_enabled(SimpleNamespace(allow_tf32=False))
    assert amm_triton.tf32_enabled(SimpleNamespace(fp32_precision="none", allow_tf32=True))
    assert not amm_triton.tf32_enabled(SimpleNamespace(fp32_precision="ieee", allow_tf32=True))

    class Refusing:  # torch's answer to a mix of the legacy and new APIs
        fp32_precision = "none"

        @property
        def allow_tf32(self):
            raise RuntimeError("mix of the legacy and new APIs")

    assert not amm_triton.tf32_enabled(Refusing())


def _args(dtype, w_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_dtype = w_dtype or dtype
    return dict(grad_output=torch.randn(9, 20, generator=g).to(dtype),
                weight=torch.randn(20, 11, generator=g).to(w_dtype),
                selected=torch.tensor([1, 4, 5, 13, 19]),
                left=torch.randn(9, 3, generator=g).to(dtype), right=torch.randn(3, 11, generator=g).to(dtype))


def test_fp32_without_tf32_runs_the_torch_path(fp32_precision, monkeypatch):
    launched = []
    monkeypatch.setattr(amm_triton, "launch_amm", lambda *a, **kw: launched.append(a) or "kernel")
    args = _args(torch.float32)
    fp32_precision("ieee")
    assert torch.equal(amm_triton.celora_grad_input_triton(**args), celora_grad_input(**args))
    assert not launched
    fp32_precision("tf32")  # with TF32 the same call goes to the kernel (tensor cores)
    assert amm_triton.celora_grad_input_triton(**args) == "kernel" and len(launched) == 1
    args64 = _args(torch.float64)  # not a specialisation at all
    assert torch.equal(amm_triton.celora_grad_input_triton(**args64), celora_grad_input(**args64))
    assert len(launched) == 1


def test_dtype_pairs_the_kernel_runs():
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    for pair in [(bf16, bf16), (fp16, fp16), (bf16, fp32), (fp16, fp32)]:
        assert amm_triton.kernel_supports(*pair), pair
    for pair in [(fp32, bf16), (bf16, fp16), (fp16, bf16), (torch.float64, torch.float64), (bf16, torch.float64)]:
        assert not amm_triton.kernel_supports(*pair), pair


def test_autotune_pruning_per_arch_and_dtype():
    configs, names = amm_triton.GPU_CONFIGS, [amm_triton.config_name(c) for c in amm_triton.GPU_CONFIGS]
    assert amm_triton._amm_kernel_tuned.early_config_prune is amm_triton.fitting_configs
    h100, a100 = ((9, 0), 227 * 1024), ((8, 0), 163 * 1024)
    bf16, fp32 = torch.bfloat16, torch.float32

    def kept(device, g, w):
        return [amm_triton.config_name(c) for c in amm_triton.configs_for(configs, *device, g, w)]

    assert kept(h100, bf16, bf16) == names  # every bf16 tile fits Hopper
    assert kept(a100, bf16, fp32) == [n for n in names if n != "256x128x64-s3-w8"]  # spills on sm_80
    tf32_h100 = kept(h100, fp32, fp32)
    assert "128x256x64-s3-w8" not in tf32_h100 and "64x128x64-s4-w4" in tf32_h100  # 288 / 192 KiB
    assert "64x128x64-s4-w4" in kept(a100, fp32, fp32)  # 144 KiB on sm_80
    assert kept(((12, 0), 227 * 1024), bf16, bf16) == kept(a100, bf16, bf16)  # non-Hopper: sm_80's table
    small = kept(((8, 9), 99 * 1024), fp32, fp32)  # Ada: 99 KiB per block
    assert small == ["128x128x32-s4-w4", "128x64x32-s4-w4", "64x64x64-s3-w4"]
    assert kept(((8, 0), 1024), bf16, bf16) == ["64x64x64-s3-w4"]  # nothing fits: the smallest tile


def test_padded_operands():
    """[G[:, I] | 0 | left | 0] and [right ; 0], both segments padded to PAD_K; idx padded by a kept row."""
    args = _args(torch.bfloat16, torch.float32)
    G, idx, left, right = args["grad_output"], args["selected"], args["left"], args["right"]
    A, idx_p, R, K1, K2 = amm_triton.gathered_operands(G, idx, left.float(), right.float())
    P = amm_triton.PAD_K
    assert (K1, K2) == (P, P) and A.shape == (9, 2 * P) and A.is_contiguous() and A.dtype == G.dtype
    assert torch.equal(A[:, :5], G[:, idx]) and not A[:, 5:K1].any()
    assert torch.equal(A[:, K1:K1 + 3], left) and not A[:, K1 + 3:].any()
    assert torch.equal(idx_p[:5], idx) and (idx_p[5:] == idx[0]).all() and idx_p.dtype == torch.int64
    assert R.shape == (P, 11) and R.dtype == G.dtype and torch.equal(R[:3], right) and not R[3:].any()
    full = torch.arange(P)  # a multiple of PAD_K: no padding at all; no low-rank term: no R
    A, idx_p, R, K1, K2 = amm_triton.gathered_operands(torch.randn(4, P), full, None, None)
    assert (K1, K2) == (P, 0) and A.shape == (4, P) and torch.equal(idx_p, full) and R is None


def _run_cases(path: str, expected: int, env_updates: dict[str, str], drop: tuple[str, ...] = ()) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="2", **env_updates,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for name in ("CELORA_KERNEL", *drop):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-rfEs", str(ROOT / path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(rf"\b{expected} passed\b", summary), report
    assert not re.search(r"skipped|failed|error|xfail|xpass", summary), report


def test_triton_kernels_under_interpreter():
    _run_cases("tests/interp_kernel_cases.py", 47, {"TRITON_INTERPRET": "1"})


def test_triton_kernels_compile_for_gpus(tmp_path):
    # one case per surviving (arch, dtype pair, config), the FITS coverage check, scores × 2 archs
    expected = sum(len(table) for table in amm_triton.FITS.values()) + 1 + 2
    _run_cases("tests/aot_compile_cases.py", expected, {"TRITON_CACHE_DIR": str(tmp_path)},
               drop=("TRITON_INTERPRET",))
