"""Choose the implementation of each CE-LoRA op per call (see package docstring)."""
from __future__ import annotations

import os
from typing import Callable

from torch import Tensor

from ..ops.amm import celora_grad_input as _reference_grad_input
from ..ops.amm import gradient_scores as _reference_scores

_VALID = ("auto", "torch", "triton")
OPS = ("grad_input", "scores")


def kernel_backend(device_type: str, op: str = "grad_input") -> str:
    """The backend a call of ``op`` on tensors of ``device_type`` would use: "torch" or "triton"."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    choice = os.environ.get("CELORA_KERNEL", "auto").lower()
    if choice not in _VALID:
        raise ValueError(f"CELORA_KERNEL must be one of {_VALID}, got {choice!r}")
    if choice == "torch":
        return "torch"
    triton_ok = _triton_op(op) is not None
    if choice == "triton":
        if not triton_ok:
            raise RuntimeError(f"CELORA_KERNEL=triton but the Triton kernel for {op} is unavailable")
        return "triton"
    return "triton" if (triton_ok and device_type == "cuda") else "torch"


def _triton_op(op: str) -> Callable | None:
    """The Triton implementation of ``op``, or None when Triton cannot be imported."""
    try:
        if op == "grad_input":
            from .amm_triton import celora_grad_input_triton as fn
        else:
            from .scores_triton import gradient_scores_triton as fn
    except ImportError:
        return None
    return fn



def grad_input(grad_output: Tensor, weight: Tensor, selected=None, complement=None,
               B0=None, A0=None, lora_left=None, lora_right=None) -> Tensor:
    """CE-LoRA dX; same contract as :func:`celora_dist.ops.amm.celora_grad_input`."""
    if kernel_backend(grad_output.device.type, "grad_input") == "triton":
        return _triton_op("grad_input")(grad_output, weight, selected, complement, B0, A0, lora_left, lora_right)
    return _reference_grad_input(grad_output, weight, selected, complement, B0, A0, lora_left, lora_right)


def gradient_scores(grad_output: Tensor) -> Tensor:
    """Refresh-step scores ‖G[:, i]‖² in fp32; contract of :func:`celora_dist.ops.amm.gradient_scores`."""
    if kernel_backend(grad_output.device.type, "scores") == "triton":
        return _triton_op("scores")(grad_output)
    return _reference_scores(grad_output)


scores = gradient_scores  # the dispatcher's "scores" entry
