"""The double-LoRA split of a frozen weight (docs/design.md §1): W0 = B0 A0 + Ws.

Computed once per layer at start; the backward then needs only B0, A0 and the
residual's row norms ‖Ws[i, :]‖² (for the scores) — never Ws itself.

Two ways to find the top-r0 singular triplets (:class:`SVDMethod`): the exact
``torch.linalg.svd`` (cost ∝ m·n·min(m, n): seconds to minutes per matrix on CPU
at 1B–8B shapes) or a randomized range finder with oversampling and power
iterations (cost ∝ m·n·(r0 + oversample)·(2·niter + 2)). The randomized one is
seeded from the weight's own bytes, so its factors are a pure function of
(weight, r0, method): identical on every rank and run, cacheable under the same
key, and torch's global RNG is never touched.
"""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from .config import EXACT, SVDMethod

# Row block of the residual-norm pass: bounds the fp32 temporary to _ROW_BLOCK × n
# instead of a full m × n copy of W0.
_ROW_BLOCK = 2048


def weight_digest(weight: Tensor) -> str:
    """blake2b of the weight's raw bytes (the factor cache's key and the randomized SVD's seed)."""
    w = weight.detach().to("cpu").contiguous()
    return hashlib.blake2b(w.view(torch.uint8).reshape(-1).numpy(), digest_size=20).hexdigest()


def seed_of(digest: str) -> int:
    """A 63-bit generator seed from a :func:`weight_digest`."""
    return int(digest[:16], 16) >> 1


def top_singular(w: Tensor, r0: int, svd: SVDMethod = EXACT, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(U[:, :r0], S[:r0], Vh[:r0]) of the fp32 matrix ``w`` by ``svd``.

    Randomized: ``torch.svd_lowrank`` draws its test matrix from torch's global RNG (no
    generator argument), which would make the split depend on — and shift — the caller's
    random state; so the few lines of its range finder are repeated here with an explicit
    CPU ``torch.Generator`` seeded by ``seed``. The test matrix is drawn on CPU and moved,
    so a CPU and a GPU run start from the same one.
    """
    if svd.method == "exact":
        if w.shape[1] > w.shape[0]:  # LAPACK on the tall orientation: 2048x8192 took 17.4 s at one
            V, S, Uh = torch.linalg.svd(w.T, full_matrices=False)  # thread, its transpose 5.8 s
            return Uh[:r0].T, S[:r0], V[:, :r0].T
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        return U[:, :r0], S[:r0], Vh[:r0]
    m, n = w.shape
    width = min(r0 + svd.oversample, m, n)
    omega = torch.randn(n, width, generator=torch.Generator().manual_seed(seed), dtype=w.dtype)
    Q = torch.linalg.qr(w @ omega.to(w.device)).Q
    for _ in range(svd.niter):  # re-orthonormalised each half step (HMT Alg. 4.4)
        Q = torch.linalg.qr(w.T @ Q).Q
        Q = torch.linalg.qr(w @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ w, full_matrices=False)
    return Q @ Ub[:, :r0], S[:r0], Vh[:r0]


def double_lora_factors(weight: Tensor, r0: int, dtype: torch.dtype, svd: SVDMethod = EXACT,
                        seed: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD split of W0 (in fp32): B0 = U[:, :r0]√Σ, A0 = √Σ Vᵀ[:r0].

    Returns (B0, A0) in ``dtype`` and ‖Ws[i, :]‖² in fp32, where Ws = W0 − B0 A0 is
    formed with the *stored* (dtype-rounded) factors, i.e. the residual the backward
    really approximates. ``svd``: see :func:`top_singular`; the randomized split's ``seed``
    defaults to one derived from the weight's bytes (:func:`weight_digest`), so equal
    weights get equal factors wherever they are factorised.
    """
    w = weight.detach()
    m, n = w.shape
    if r0 > 0:
        if seed is None and svd.method != "exact":
            seed = seed_of(weight_digest(w))
        U, S, Vh = top_singular(w.float(), r0, svd, seed or 0)
        root = S.sqrt()
        # contiguous: LAPACK's factors are column-major, and DeepSpeed's engine
        # broadcasts parameters as byte views, which need a unit last stride.
        B0 = (U * root).to(dtype).contiguous()
        A0 = (root[:, None] * Vh).to(dtype).contiguous()
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
