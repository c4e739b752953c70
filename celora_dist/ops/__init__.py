"""Pure-torch reference of every kernel: the specification the Triton kernels are
tested against, and the CPU fallback."""
from .amm import celora_grad_input, gradient_scores

__all__ = ["celora_grad_input", "gradient_scores"]
