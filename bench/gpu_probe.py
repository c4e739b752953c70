"""First contact with a GPU machine: versions, Triton's toolchain, one bf16 launch of each kernel.

    python bench/gpu_probe.py --device cuda     # bench/gpu.sh's first step
    python bench/gpu_probe.py --device cpu      # versions and toolchain; kernels skipped (no CUDA)

No GPU had run this code before the first lent machine, so this is what a first call must
bring back even if every benchmark after it fails: torch / CUDA / driver / Triton versions,
the GPU and its compute capability, whether the C compiler and Python headers that Triton
builds its launcher stub with are there, the bf16 matrix rate the time limits of gpu.sh
assume, and one bf16 launch of each Triton kernel (``celora_grad_input_triton``,
``gradient_scores_triton``, imported from their modules: NOT through ``celora_dist.kernels``,
whose guard would turn a failing kernel into a silent torch fallback) checked
against an fp32 reference written out here, with the autotuner's choice and the first
call's compile + autotune time.

Each check is one table row, printed as soon as it finishes (status ok / FAIL / skip /
info); a failing check prints its cause as a row and its traceback to stderr, and the
next check runs. Exit status 1 if any check failed, else 0: the script itself never stops
at a failure.
"""
from __future__ import annotations

import argparse
import ctypes.util
import importlib.metadata
import inspect
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # celora_dist from this checkout, also when run as `python bench/...`
    sys.path.insert(0, str(ROOT))

COLUMNS = ["check", "status", "detail"]
# bf16 operands, fp32 accumulation: ‖out − ref‖ / ‖ref‖ lands between 1e-3 and 1e-2
# (the device README's guide for bf16); above 1e-2 the kernel computes something else.
BF16_TOL = 1e-2
# The scores kernel sums exact fp32 squares of bf16 values: only the summation order differs.
SCORES_TOL = 1e-4
# The layer form gpu.sh's layer and backend steps launch: T, m, n multiples of 16, k not
# (k = ceil(0.55 m)), r + r0 = 28 low-rank columns. Triton specialises a kernel on which
# integer arguments divide by 16, so this compiles the variant those steps use and leaves
# it in Triton's on-disk cache for them.
T, M, N, KEEP, RANK = 2048, 2048, 2048, 0.55, 28


class Failed(Exception):
    """A check that ran and found something wrong (a FAIL row without a traceback)."""


class Probe:
    """Runs checks, printing each as one row; remembers whether any failed."""

    def __init__(self) -> None:
        self.failed = 0
        # no torch import before the first row: a broken torch must still leave a table
        print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)

    def row(self, check: str, status: str, detail: str) -> None:
        detail = " ".join(str(detail).split()).replace("|", "/")  # one table cell
        print(f"| {check} | {status} | {detail[:400]} |", flush=True)
        self.failed += status == "FAIL"

    def run(self, check: str, fn: Callable[[], tuple[str, str]]) -> str:
        """``fn`` returns (status, detail); an exception becomes a FAIL row with its cause.
        Returns the status."""
        try:
            status, detail = fn()
        except Failed as e:
            status, detail = "FAIL", str(e)
        except Exception as e:  # noqa: BLE001  (the point of the probe: report, never stop)
            print(f"=== gpu_probe: {check} failed", file=sys.stderr)
            traceback.print_exc()
            status, detail = "FAIL", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        self.row(check, status, detail)
        return status


def version_of(package: str) -> str:
    """The installed version, read from the package's metadata: importing it (deepspeed
    above all) would run its start-up and could fail for reasons of its own."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def first_line(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else f"(no output, rc={out.returncode})"


def c_compiler() -> tuple[str, str]:
    """Triton compiles its CUDA launcher stub with $CC, else the first of cc / gcc / clang."""
    cc = os.environ.get("CC")
    found = [(name, shutil.which(name)) for name in ("cc", "gcc", "clang")]
    path = cc or next((p for _, p in found if p), None)
    if path is None:
        return "FAIL", "no C compiler (CC unset; cc, gcc, clang not on PATH): Triton cannot build its launcher"
    listed = ", ".join(f"{n}={p or 'absent'}" for n, p in found)
    return "ok", f"{first_line([path, '--version'])} ({'CC=' + cc + ', ' if cc else ''}{listed})"


def python_headers() -> tuple[str, str]:
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.exists():
        return "FAIL", f"{header} missing: Triton's launcher stub cannot be compiled"
    return "ok", str(header)


def libcuda() -> tuple[str, str]:
    """Where Triton would look for libcuda (ldconfig's cache, LD_LIBRARY_PATH, its env override).
    Informational: the "triton driver utils" row is the test."""
    env = os.environ.get("TRITON_LIBCUDA_PATH")
    dirs = os.environ.get("LD_LIBRARY_PATH", "").split(":")
    in_path = [d for d in dirs if d and any(Path(d).glob("libcuda.so*"))]
    return "info", (f"find_library: {ctypes.util.find_library('cuda') or 'not found'}; LD_LIBRARY_PATH dirs "
                    f"with libcuda: {in_path or 'none'}; TRITON_LIBCUDA_PATH={env or 'unset'}")


def triton_toolchain() -> tuple[str, str]:
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    cache = os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache (default)")
    bundled = "present" if ptxas.exists() else "absent"
    return "ok", f"triton {triton.__version__}; bundled ptxas {bundled}; cache {cache}"


def torch_versions() -> tuple[str, str]:
    import torch

    return "info", (f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
                    f"cuda available: {torch.cuda.is_available()}, python {platform.python_version()} "
                    f"({sys.executable})")


def packages() -> tuple[str, str]:
    # gpu.sh's steps need transformers and peft; deepspeed is not on the GPU image and not needed
    names = ("transformers", "peft", "numpy", "deepspeed")
    return "info", ", ".join(f"{m} {version_of(m)}" for m in names)


def tf32_state() -> tuple[str, str]:
    import torch

    parts = []
    try:  # torch >= 2.9's switch, read first: after it is set, the old flag's getter raises
        parts.append(f"fp32_precision={torch.backends.fp32_precision}")
    except AttributeError:
        pass
    try:
        parts.append(f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
    except Exception as e:  # noqa: BLE001
        parts.append(f"matmul.allow_tf32 raises {type(e).__name__}")
    return "info", ", ".join(parts)


def dispatch() -> tuple[str, str]:
    from celora_dist.kernels import kernel_backend

    setting = os.environ.get("CELORA_KERNEL", "auto")
    ops = ", ".join(f"{op}: {kernel_backend('cuda', op)}" for op in ("grad_input", "scores"))
    return "info", f"CELORA_KERNEL={setting}; CUDA tensors would run {ops}"


# ---- CUDA-only checks -------------------------------------------------------------------

def gpu() -> tuple[str, str]:
    import torch

    if not torch.cuda.is_available():
        raise Failed("torch.cuda.is_available() is False: no CUDA device visible to torch")
    p = torch.cuda.get_device_properties(0)
    return "ok", (f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                  f"{p.multi_processor_count} SMs, {torch.cuda.device_count()} device(s)")


def driver() -> tuple[str, str]:
    if shutil.which("nvidia-smi") is None:
        return "info", "nvidia-smi not on PATH"
    return "ok", first_line(["nvidia-smi", "--query-gpu=driver_version,name,memory.total,clocks.max.sm",
                             "--format=csv,noheader"])


def triton_driver() -> tuple[str, str]:
    """Triton's CUDA driver utilities: the first thing that compiles C (gcc + Python.h + libcuda)."""
    import triton

    t0 = time.perf_counter()
    target = triton.runtime.driver.active.get_current_target()
    return "ok", f"target {target} ({time.perf_counter() - t0:.1f} s)"


def bf16_rate() -> tuple[str, str]:
    """The bf16 matrix rate gpu.sh's time limits assume (the device notes measured ~790 TFLOP/s)."""
    import torch

    n = 8192
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", generator=g, dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", generator=g, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    return "info", f"{2 * n ** 3 / seconds / 1e12:.0f} TFLOP/s ({n}^3 bf16 matmul, mean of 10 after 3 warm-ups)"


def autotune_choice(fn: Callable) -> str:
    """The autotuner's last choice for the kernels of ``fn``'s module (found by type, not by
    name: the kernel modules may hold one autotuner or several)."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError as e:
        return f"autotune choice unknown ({e})"
    module = inspect.getmodule(fn)
    tuners, chosen = [], []
    for name, obj in vars(module).items():
        candidates = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else (obj,)
        for tuner in candidates:
            if isinstance(tuner, Autotuner):
                tuners.append(name)
                best = getattr(tuner, "best_config", None)
                if best is not None:
                    chosen.append(f"{name}: {best}")
    if chosen:
        return "autotune: " + "; ".join(chosen)
    if tuners:
        return f"autotune: {', '.join(tuners)} chose nothing (a fixed config ran, e.g. the interpreter's)"
    return "autotune: none (fixed config)"


def timed(fn: Callable, device: str, *args):
    """(result, seconds) of one call, the device synchronised around it."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn(*args)
    sync()
    return out, time.perf_counter() - t0


def relative_error(out, ref) -> float:
    if tuple(out.shape) != tuple(ref.shape):
        raise Failed(f"output shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    out = out.float()
    if not bool(out.isfinite().all()):
        raise Failed("non-finite values in the output (unwritten or overflowed elements)")
    return float((out - ref).norm() / ref.norm())


def grad_input_kernel(device: str = "cuda", t: int = T, m: int = M, n: int = N,
                      weight_dtype: str = "bfloat16") -> tuple[str, str]:
    """One bf16 launch of the dX kernel G[:, I] W0[I] + left @ right against an fp32 reference;
    ``weight_dtype="float32"``: the autocast form (bf16 G, fp32 master W0/left/right)."""
    import math

    import torch

    from celora_dist.kernels.amm_triton import celora_grad_input_triton as fn

    wdt = getattr(torch, weight_dtype)
    g = torch.Generator(device=device).manual_seed(0)
    k = math.ceil(KEEP * m)
    G = torch.randn(t, m, device=device, generator=g).to(torch.bfloat16)
    W0 = (torch.randn(m, n, device=device, generator=g) * m ** -0.5).to(torch.bfloat16).to(wdt)
    left = (torch.randn(t, RANK, device=device, generator=g) * 0.1).to(torch.bfloat16).to(wdt)
    right = (torch.randn(RANK, n, device=device, generator=g) * 0.1).to(torch.bfloat16).to(wdt)
    idx = torch.randperm(m, device=device, generator=g)[:k].sort().values
    ref = G.float()[:, idx] @ W0.float()[idx] + left.float() @ right.float()
    out, first = timed(fn, device, G, W0, idx, left, right)
    if out.dtype != G.dtype:
        raise Failed(f"dX in {out.dtype}, the contract says G's dtype ({G.dtype})")
    err = relative_error(out, ref)
    _, again = timed(fn, device, G, W0, idx, left, right)
    status = "ok" if err <= BF16_TOL else "FAIL"
    return status, (f"T={t} m={m} n={n} k={k} r+r0={RANK} W0 {weight_dtype}: rel err {err:.1e} (tol {BF16_TOL:g}); "
                    f"first call {first:.1f} s (compile + autotune), then {1e3 * again:.2f} ms; {autotune_choice(fn)}")


def grad_input_kernel_fp32_weight(device: str = "cuda") -> tuple[str, str]:
    return grad_input_kernel(device, weight_dtype="float32")


def scores_kernel(device: str = "cuda", t: int = T, m: int = 4 * M) -> tuple[str, str]:
    """One bf16 launch of the refresh-step scores ‖G[:, i]‖² against torch in fp32."""
    import torch

    from celora_dist.kernels.scores_triton import gradient_scores_triton as fn

    g = torch.Generator(device=device).manual_seed(1)
    G = torch.randn(t, m, device=device, generator=g).to(torch.bfloat16)
    ref = G.float().pow(2).sum(0)
    out, first = timed(fn, device, G)
    if out.dtype != torch.float32:
        raise Failed(f"scores in {out.dtype}, the contract says fp32")
    err = relative_error(out, ref)
    _, again = timed(fn, device, G)
    status = "ok" if err <= SCORES_TOL else "FAIL"
    return status, (f"T={t} m={m}: rel err {err:.1e} (tol {SCORES_TOL:g}); first call {first:.1f} s "
                    f"(compile), then {1e3 * again:.2f} ms; {autotune_choice(fn)}")


# Run whenever --device cuda: they say why torch may not see a GPU (driver, libcuda, Triton's C build).
CUDA_CHECKS = [("libcuda", libcuda), ("gpu", gpu), ("driver", driver), ("triton driver utils", triton_driver)]
# Run only when torch sees a GPU (else each would fail with the same cause as the gpu row).
# The scores kernel (one compile) before the dX kernel (8 compiles + autotuning): a probe cut
# off by its time limit still has the quick one.
GPU_CHECKS = [("bf16 matmul rate", bf16_rate), ("kernel gradient_scores bf16", scores_kernel),
              ("kernel grad_input bf16", grad_input_kernel),
              ("kernel grad_input bf16 G + fp32 W0 (autocast)", grad_input_kernel_fp32_weight)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    a = p.parse_args(argv)
    print(f"# gpu probe, device={a.device}, {platform.node()}, {platform.platform()}", flush=True)
    probe = Probe()
    t_start = time.perf_counter()
    probe.run("torch", torch_versions)
    probe.run("packages", packages)
    probe.run("C compiler", c_compiler)
    probe.run("Python headers", python_headers)
    probe.run("triton", triton_toolchain)
    probe.run("TF32 state", tf32_state)
    probe.run("celora dispatch", dispatch)
    if a.device == "cuda":
        seen = {name: probe.run(name, check) for name, check in CUDA_CHECKS}
        for name, check in GPU_CHECKS:
            if seen["gpu"] == "ok":
                probe.run(name, check)
            else:
                probe.row(name, "skip", "no GPU visible to torch (the gpu row)")
    else:
        for name, _ in CUDA_CHECKS + GPU_CHECKS:
            probe.row(name, "skip", "no CUDA (--device cpu)")
    print(f"# probe done in {time.perf_counter() - t_start:.1f} s, {probe.failed} check(s) failed", flush=True)
    return 1 if probe.failed else 0


if __name__ == "__main__":
    sys.exit(main())
