"""Choose the implementation of each CE-LoRA op per call (see package docstring).

One environment read per call (``CELORA_KERNEL``: a test or a user may switch it
between calls); the choice for a (setting, device type, op) and the Triton module
import are resolved once and cached. Every Triton call is guarded: an exception from
its import, compile or launch runs the torch reference instead, then and for every
later call of that op (``fallback.py``), so a GPU step never dies on a kernel.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Callable

from torch import Tensor

from ..ops import amm as _reference
from .fallback import OPS, failed, record_failure

_VALID = ("auto", "torch", "triton")
_REFERENCE = {"grad_input": "celora_grad_input", "scores": "gradient_scores"}  # names in ops/amm.py


_TRITON = {"grad_input": ("amm_triton", "celora_grad_input_triton"),
           "scores": ("scores_triton", "gradient_scores_triton")}


def _setting() -> str:
    return os.environ.get("CELORA_KERNEL", "auto").lower()


def kernel_backend(device_type: str, op: str = "grad_input") -> str:
    """The backend a call of ``op`` on tensors of ``device_type`` would use now: "torch" or
    "triton" (under ``auto``: the device's default approximate backend, before any
    measurement; "torch" once the op's Triton kernel failed)."""
    backend = configured_backend(device_type, op)
    return "torch" if backend == "triton" and failed(op) else backend


def configured_backend(device_type: str, op: str = "grad_input") -> str:
    """What the setting resolves ``op`` to on ``device_type``, failures ignored (rank-independent)."""
    return _resolve(_setting(), device_type, op)


def triton_may_run(device_type: str) -> bool:
    """Whether Triton kernels may run in this process on ``device_type``: ``CELORA_KERNEL=triton``,
    or ``auto`` on CUDA. A function of the setting and the device type only, never of a failure or
    of what imported, so every rank answers alike (the schedule syncs failure flags only then)."""
    choice = _setting()
    return choice == "triton" or (choice == "auto" and device_type == "cuda")


def measured_backends() -> bool:
    """True under ``CELORA_KERNEL=auto``: layers choose their dX backend by measurement
    (``kernels.choice``); "torch"/"triton" force one. Raises on an unknown setting."""
    choice = _setting()
    if choice not in _VALID:
        raise ValueError(f"CELORA_KERNEL must be one of {_VALID}, got {choice!r}")
    return choice == "auto"


@functools.lru_cache(maxsize=None)
def _resolve(choice: str, device_type: str, op: str) -> str:
    """The backend for one setting of CELORA_KERNEL; raises on bad input.

    ``triton`` is honoured even where the module does not import: the guarded call then
    warns with the import error and runs torch (a forced setting degrades, never crashes)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if choice not in _VALID:
        raise ValueError(f"CELORA_KERNEL must be one of {_VALID}, got {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        return "triton"
    return "triton" if (device_type == "cuda" and _triton_module(op) is not None) else "torch"


_import_errors: dict[str, Exception] = {}


@functools.lru_cache(maxsize=None)
def _triton_module(op: str):
    """The module holding the Triton implementation of ``op``, or None when it cannot be imported
    (the exception is kept in ``_import_errors`` for the fallback's warning)."""
    try:
        return importlib.import_module(f".{_TRITON[op][0]}", __package__)
    except Exception as exc:  # ImportError, or a broken triton raising anything at import
        _import_errors[op] = exc
        return None


def _triton_function(op: str) -> Callable:
    module = _triton_module(op)
    if module is None:
        err = _import_errors.get(op)
        raise RuntimeError(f"cannot import the Triton kernel for {op} ({type(err).__name__}: {err})")
    return getattr(module, _TRITON[op][1])  # looked up per call: patchable


def _guarded(op: str) -> Callable:
    """``op``'s Triton implementation behind the fallback guard (same contract as the reference)."""
    def call(*args: Any, **kwargs: Any) -> Tensor:
        reference = getattr(_reference, _REFERENCE[op])
        if failed(op):
            return reference(*args, **kwargs)
        try:
            return _triton_function(op)(*args, **kwargs)
        except Exception as exc:  # compile or launch: no gcc/headers/libcuda, ptxas, shared memory, autotuner
            result = reference(*args, **kwargs)  # bad input raises here too: the caller's error, not Triton's
            record_failure(op, exc)
            return result
    return call


def implementation(backend: str, op: str = "grad_input") -> Callable:
    """The function implementing ``op`` on ``backend`` ("torch" or "triton"), same contract;
    "triton" is guarded: a failure runs the torch reference (``fallback.py``)."""
    if backend == "triton":
        return _guarded(op)
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}; expected 'torch' or 'triton'")
    return getattr(_reference, _REFERENCE[op])  # looked up per call, like the Triton one


def _impl(op: str, device_type: str) -> Callable:
    return implementation(kernel_backend(device_type, op), op)


def grad_input(grad_output: Tensor, weight: Tensor, selected: Tensor | None = None,
               left: Tensor | None = None, right: Tensor | None = None) -> Tensor:
    """CE-LoRA dX ``G[:, I] W0[I] + left @ right``; contract of :func:`celora_dist.ops.amm.celora_grad_input`."""
    return _impl("grad_input", grad_output.device.type)(grad_output, weight, selected, left, right)


def gradient_scores(grad_output: Tensor) -> Tensor:
    """Refresh-step scores ‖G[:, i]‖² in fp32; contract of :func:`celora_dist.ops.amm.gradient_scores`."""
    return _impl("scores", grad_output.device.type)(grad_output)
