"""Kernel dispatch: one entry point per op (dX ``grad_input``, refresh ``gradient_scores``), Triton where it pays, torch reference otherwise.

``CELORA_KERNEL=torch`` forces the reference, ``CELORA_KERNEL=triton`` forces Triton
(also on CPU tensors under ``TRITON_INTERPRET=1``), ``auto`` (default) uses Triton for
CUDA tensors when it is importable.
"""
from .dispatch import grad_input, gradient_scores, kernel_backend

__all__ = ["grad_input", "gradient_scores", "kernel_backend"]
