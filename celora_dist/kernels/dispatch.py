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

from ..ops.amm import celora_grad_input as _reference_grad_input
from ..ops.amm import gradient_scores as _reference_scores

_VALID = ("auto", "torch", "triton")
OPS = ("grad_input", "scores")
_REFERENCE: dict[str, Callable] = {"grad_input": _reference_grad_input, "scores": _reference_scores}


_TRITON = {"grad_input": ("amm_triton", "celora_grad_input_triton"),
           "scores": ("scores_triton", "gradient_scores_triton")}


def kernel_backend(device_type: str, op: str = "grad_input") -> str:
    """The backend a call of ``op`` on tensors of ``device_type`` would use: "torch" or "triton"."""
    return _resolve(os.environ.get("CELORA_KERNEL", "auto").lower(), device_type, op)


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


def _impl(op: str, device_type: str) -> Callable:
    if kernel_backend(device_type, op) == "triton":
        return getattr(_triton_module(op), _TRITON[op][1])  # looked up per call: patchable
    return _REFERENCE[op]


def grad_input(grad_output: Tensor, weight: Tensor, selected: Tensor | None = None,
               left: Tensor | None = None, right: Tensor | None = None) -> Tensor:
    """CE-LoRA dX ``G[:, I] W0[I] + left @ right``; contract of :func:`celora_dist.ops.amm.celora_grad_input`."""
    return _impl("grad_input", grad_output.device.type)(grad_output, weight, selected, left, right)


def gradient_scores(grad_output: Tensor) -> Tensor:
    """Refresh-step scores ‖G[:, i]‖² in fp32; contract of :func:`celora_dist.ops.amm.gradient_scores`."""
    return _impl("scores", grad_output.device.type)(grad_output)
