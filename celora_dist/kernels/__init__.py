"""Kernel dispatch: one entry point per op, Triton where it pays, torch reference otherwise.

``CELORA_KERNEL=torch`` forces the reference, ``CELORA_KERNEL=triton`` forces Triton
(also on CPU tensors under ``TRITON_INTERPRET=1``), ``auto`` (default) uses Triton for
CUDA tensors when it is importable.
"""
from .dispatch import grad_input, kernel_backend

__all__ = ["grad_input", "kernel_backend"]
