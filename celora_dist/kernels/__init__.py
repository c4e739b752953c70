"""Kernel dispatch: one entry point per op (dX ``grad_input``, refresh ``gradient_scores``), Triton where it pays, torch reference otherwise.

``CELORA_KERNEL=torch`` forces the reference, ``CELORA_KERNEL=triton`` forces Triton
(also on CPU tensors under ``TRITON_INTERPRET=1``), ``auto`` (default) uses Triton for
CUDA tensors when it is importable as the default, and lets each CE-LoRA layer choose
exact dense dX, torch or Triton by measurement (``choice.py``).
"""
from .choice import BACKENDS, BackendChoice, median_times, pick_backend
from .dispatch import grad_input, gradient_scores, implementation, kernel_backend, measured_backends

__all__ = ["BACKENDS", "BackendChoice", "grad_input", "gradient_scores", "implementation", "kernel_backend",
           "measured_backends", "median_times", "pick_backend"]
