"""The double-LoRA split of a frozen weight (docs/design.md §1): W0 = B0 A0 + Ws.

Computed once per layer at start; the backward then needs only B0, A0 and the
residual's row norms ‖Ws[i, :]‖² (for the scores) — never Ws itself.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Row block of the residual-norm pass: bounds the fp32 temporary to _ROW_BLOCK × n
# instead of a full m × n copy of W0.
_ROW_BLOCK = 2048


def double_lora_factors(weight: Tensor, r0: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD split of W0 (in fp32): B0 = U[:, :r0]√Σ, A0 = √Σ Vᵀ[:r0].

    Returns (B0, A0) in ``dtype`` and ‖Ws[i, :]‖² in fp32, where Ws = W0 − B0 A0 is
    formed with the *stored* (dtype-rounded) factors, i.e. the residual the backward
    really approximates.
    """
    w = weight.detach()
    m, n = w.shape
    if r0 > 0:
        U, S, Vh = torch.linalg.svd(w.float(), full_matrices=False)
        root = S[:r0].sqrt()
        # contiguous: LAPACK's factors are column-major, and DeepSpeed's engine
        # broadcasts parameters as byte views, which need a unit last stride.
        B0 = (U[:, :r0] * root).to(dtype).contiguous()
        A0 = (root[:, None] * Vh[:r0]).to(dtype).contiguous()
    else:
        B0 = w.new_zeros(m, 0, dtype=dtype)
        A0 = w.new_zeros(0, n, dtype=dtype)
    return B0, A0, residual_row_sq(w, B0, A0)


def check_r0(r0: int, m: int, n: int, name: str = "") -> None:
    """The split needs r0 below both dimensions of W0 (m × n)."""
    if r0 >= min(m, n):
        raise ValueError(f"r0={r0} must be below min(out_features, in_features)={min(m, n)} "
                         f"for {name or 'layer'} ({m}x{n})")


@torch.no_grad()
def residual_row_sq(weight: Tensor, B0: Tensor, A0: Tensor) -> Tensor:
    """‖(W − B0 A0)[i, :]‖² per row in fp32, in row blocks (never a full fp32 copy)."""
    m = weight.shape[0]
    out = torch.empty(m, dtype=torch.float32, device=weight.device)
    A0f = A0.float()
    for start in range(0, m, _ROW_BLOCK):
        stop = min(m, start + _ROW_BLOCK)
        block = weight[start:stop].float() - B0[start:stop].float() @ A0f
        out[start:stop] = (block * block).sum(dim=1)
    return out
