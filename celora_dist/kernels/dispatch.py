"""Choose the implementation of the CE-LoRA dX per call (see package docstring)."""
from __future__ import annotations

import os

from torch import Tensor

from ..ops.amm import celora_grad_input as _reference_grad_input

_VALID = ("auto", "torch", "triton")


def kernel_backend(device_type: str) -> str:
    """The backend a call on tensors of ``device_type`` would use: "torch" or "triton"."""
    choice = os.environ.get("CELORA_KERNEL", "auto").lower()
    if choice not in _VALID:
        raise ValueError(f"CELORA_KERNEL must be one of {_VALID}, got {choice!r}")
    if choice == "torch":
        return "torch"
    triton_ok = _triton_grad_input() is not None
    if choice == "triton":
        if not triton_ok:
            raise RuntimeError("CELORA_KERNEL=triton but the Triton kernels are unavailable")
        return "triton"
    return "triton" if (triton_ok and device_type == "cuda") else "torch"


def _triton_grad_input():
    try:
        from .amm_triton import celora_grad_input_triton
    except ImportError:
        return None
    return celora_grad_input_triton


def grad_input(grad_output: Tensor, weight: Tensor, selected=None, complement=None,
               B0=None, A0=None, lora_left=None, lora_right=None) -> Tensor:
    """CE-LoRA dX; same contract as :func:`celora_dist.ops.amm.celora_grad_input`."""
    if kernel_backend(grad_output.device.type) == "triton":
        return _triton_grad_input()(grad_output, weight, selected, complement, B0, A0, lora_left, lora_right)
    return _reference_grad_input(grad_output, weight, selected, complement, B0, A0, lora_left, lora_right)
