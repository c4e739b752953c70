"""Choose the implementation of each CE-LoRA op per call (see package docstring).

One environment read per call (``CELORA_KERNEL``: a test or a user may switch it
between calls); the choice for a (setting, device type, op) and the Triton module
import are resolved once and cached.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

from torch import Tensor

from ..ops import amm as _reference

_VALID = ("auto", "torch", "triton")
OPS = ("grad_input", "scores")
_REFERENCE = {"grad_input": "celora_grad_input", "scores": "gradient_scores"}  # names in ops/amm.py


_TRITON = {"grad_input": ("amm_triton", "celora_grad_input_triton"),
           "scores": ("scores_triton", "gradient_scores_triton")}


def _setting() -> str:
    return os.environ.get("CELORA_KERNEL", "auto").lower()


def kernel_backend(device_type: str, op: str = "grad_input") -> str:
    """The backend a call of ``op`` on tensors of ``device_type`` would use: "torch" or "triton"
    (under ``auto``: the device's default approximate backend, before any measurement)."""
    return _resolve(_setting(), device_type, op)


def measured_backends() -> bool:
    """True under ``CELORA_KERNEL=auto``: layers choose their dX backend by measurement
    (``kernels.choice``); "torch"/"triton" force one. Raises on an unknown setting."""
    choice = _setting()
    if choice not in _VALID:
        raise ValueError(f"CELORA_KERNEL must be one of {_VALID}, got {choice!r}")
    return choice == "auto"


@functools.lru_cache(maxsize=None)
def _resolve(choice: str, device_type: str, op: str) -> str:
    """The backend for one setting of CELORA_KERNEL; raises on bad input."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if choice not in _VALID:
        raise ValueError(f"CELORA_KERNEL must be one of {_VALID}, got {choice!r}")
    if choice == "torch":
        return "torch"
    triton_ok = _triton_module(op) is not None
    if choice == "triton":
        if not triton_ok:
            raise RuntimeError(f"CELORA_KERNEL=triton but the Triton kernel for {op} is unavailable")
        return "triton"
    return "triton" if (triton_ok and device_type == "cuda") else "torch"


@functools.lru_cache(maxsize=None)
def _triton_module(op: str):
    """The module holding the Triton implementation of ``op``, or None when Triton cannot be imported."""
    import importlib

    try:
        return importlib.import_module(f".{_TRITON[op][0]}", __package__)
    except ImportError:
        return None


def implementation(backend: str, op: str = "grad_input") -> Callable:
    """The function implementing ``op`` on ``backend`` ("torch" or "triton"), same contract."""
    if backend == "triton":
        module = _triton_module(op)
        if module is None:
            raise RuntimeError(f"the Triton kernel for {op} is unavailable (triton cannot be imported)")
        return getattr(module, _TRITON[op][1])  # looked up per call: patchable
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
