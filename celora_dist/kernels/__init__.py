"""Kernel dispatch: one entry point per op (dX ``grad_input``, refresh ``gradient_scores``), Triton where it pays, torch reference otherwise.

``CELORA_KERNEL=torch`` forces the reference, ``CELORA_KERNEL=triton`` forces Triton
(also on CPU tensors under ``TRITON_INTERPRET=1``), ``auto`` (default) uses Triton for
CUDA tensors when it is importable as the default, and lets each CE-LoRA layer choose
exact dense dX, torch or Triton by measurement (``choice.py``). A Triton failure falls
back to torch for that op, once per process and on every rank (``fallback.py``).
"""
from .choice import BACKENDS, BackendChoice, event_median_times, median_times, pick_backend
from .dispatch import (configured_backend, grad_input, gradient_scores, implementation, kernel_backend,
                       measured_backends, triton_may_run)
from .fallback import KernelFallbackWarning

__all__ = ["BACKENDS", "BackendChoice", "KernelFallbackWarning", "configured_backend", "event_median_times",
           "grad_input", "gradient_scores", "implementation", "kernel_backend", "measured_backends",
           "median_times", "pick_backend", "triton_may_run"]
