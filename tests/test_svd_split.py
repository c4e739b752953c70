"""The randomized SVD split (celora_dist/factors.py, CELoRAConfig.svd): deterministic for a
weight, blind to torch's global RNG, and close to the exact split's optimum on a matrix whose
spectrum is known in closed form; bad settings are refused naming the field."""
from __future__ import annotations

import math

import pytest
import torch

from celora_dist import CELoRAConfig
from celora_dist.config import SVDMethod
from celora_dist.factors import double_lora_factors
from celora_dist.train.cli import parse_args
from celora_dist.train.errors import UsageError

from .conftest import decaying_weight

M, N, DECAY = 256, 192, 0.15


def _spectrum() -> torch.Tensor:
    """decaying_weight's singular values, by construction (orthonormal U, V from QR)."""
    return torch.exp(-DECAY * torch.arange(min(M, N), dtype=torch.float64)) + 0.05


def _residual(weight: torch.Tensor, r0: int, svd: SVDMethod) -> float:
    return double_lora_factors(weight, r0, torch.float32, svd=svd)[2].double().sum().sqrt().item()


def test_randomized_split_is_deterministic_and_leaves_the_global_rng_alone():
    w = decaying_weight(M, N)
    rand = SVDMethod("randomized", oversample=8, niter=2)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = double_lora_factors(w, 14, torch.float32, svd=rand)
    assert torch.equal(torch.random.get_rng_state(), before)  # nothing drawn from the global RNG
    torch.manual_seed(999)
    torch.randn(1000)  # another global state: same factors, bit for bit
    b = double_lora_factors(w, 14, torch.float32, svd=rand)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the seed is the weight's: an explicit other seed draws another test matrix
    c = double_lora_factors(w, 14, torch.float32, svd=rand, seed=1)
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("r0", [4, 14])
def test_randomized_residual_within_the_stated_bound_of_the_optimum(r0):
    """‖Ws‖_F against the Eckart–Young optimum sqrt(Σ_{j≥r0} σ_j²), known here in closed form.

    Bound. With l = r0 + p test columns, Q the found basis and B = QᵀW, the split's residual
    is ‖W − Q[B]_{r0}‖_F² = ‖(I − QQᵀ)W‖_F² + ‖B − [B]_{r0}‖_F² ≤ ‖(I − QQᵀ)W‖_F² + opt²
    (σ_j(B) ≤ σ_j(W)); with no power iteration Halko, Martinsson & Tropp (2011, Thm 10.5) bound
    the mean of the first term by (1 + r0/(p − 1))·opt², so E‖Ws‖_F² ≤ (2 + r0/(p − 1))·opt².
    Each power iteration shrinks the angle between the found and the true top-r0 subspace by
    (σ_{l+1}/σ_{r0})² (subspace iteration's rate), so the squared excess by that to the 4th
    power: after q iterations ‖Ws‖_F/opt − 1 ≲ ½(1 + r0/(p − 1))·(σ_{l+1}/σ_{r0})^{4q}.
    Always ‖Ws‖_F ≥ opt (no rank-r0 split does better).
    """
    w = decaying_weight(M, N, decay=DECAY)
    sigma = _spectrum()
    opt = sigma[r0:].pow(2).sum().sqrt().item()
    assert _residual(w, r0, SVDMethod("exact")) == pytest.approx(opt, rel=1e-5)  # the reference is right
    p = 8
    plain = _residual(w, r0, SVDMethod("randomized", oversample=p, niter=0))
    assert opt * (1 - 1e-6) <= plain <= math.sqrt(2 + r0 / (p - 1)) * opt
    for q in (1, 2):
        got = _residual(w, r0, SVDMethod("randomized", oversample=p, niter=q))
        bound = 0.5 * (1 + r0 / (p - 1)) * (sigma[r0 + p] / sigma[r0 - 1]).item() ** (4 * q)
        assert opt * (1 - 1e-6) <= got <= opt * (1 + bound), (q, got / opt - 1, bound)
        assert got <= plain


@pytest.mark.parametrize("field, value, culprit", [
    ("svd", "lanczos", "CELoRAConfig.svd must be one of"),
    ("svd_niter", -1, "CELoRAConfig.svd_niter must be a non-negative integer, got -1"),
    ("svd_oversample", 2.5, "CELoRAConfig.svd_oversample must be a non-negative integer, got 2.5"),
    ("svd_niter", True, "CELoRAConfig.svd_niter"),
])
def test_bad_svd_settings_name_the_field(field, value, culprit):
    with pytest.raises(ValueError, match=culprit.replace(".", r"\.")):
        CELoRAConfig(**{field: value})
    with pytest.raises(ValueError, match="SVDMethod: svd_niter"):
        SVDMethod("randomized", 4, -2)


def test_trainer_flags_reach_the_config(tmp_path):
    args = parse_args(["--svd", "randomized", "--svd-oversample", "4", "--svd-niter", "3",
                       "--output-dir", str(tmp_path / "run")])
    assert args.celora.svd_method == SVDMethod("randomized", 4, 3)
    assert parse_args(["--output-dir", str(tmp_path / "run")]).celora.svd_method == SVDMethod("randomized", 16, 4)
    assert parse_args(["--svd", "exact", "--output-dir", str(tmp_path / "run")]).celora.svd == "exact"
    with pytest.raises(UsageError, match="--svd-niter must be non-negative, got -1"):
        parse_args(["--svd", "randomized", "--svd-niter", "-1", "--output-dir", str(tmp_path / "run")])


def test_study_measures_what_it_says_on_a_small_matrix():
    """bench/svd_split.py's per-layer numbers, on a 96 x 64 weight: the exact split is its own
    reference (no excess, full overlap, +0 points); a randomized one that keeps every direction
    (r0 + oversample = 64 columns) finds the same subspace; errors are relative dX errors."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "svd_split.py"
    spec = importlib.util.spec_from_file_location("svd_split", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    W = bench.power_law_weight(96, 64, seed=0)
    G_sel, G_eval = bench.synthetic_gradients(96, 128, seed=1)
    bench.METHODS = {"exact": SVDMethod(), "full": SVDMethod("randomized", 64, 1),
                     "p0 q0": SVDMethod("randomized", 0, 0)}
    out = bench.study_layer(W, G_sel, G_eval, keep=0.5, repeats=1)
    assert out["exact"]["excess"] == 0 and out["exact"]["ov_grad"] == out["exact"]["ov_static"] == 1
    assert out["exact"]["dx_vs_exact_pts"] == 0 and 0 < out["exact"]["dx_err"] < 1
    assert abs(out["full"]["excess"]) < 1e-5 and out["full"]["ov_grad"] == 1
    assert out["p0 q0"]["excess"] > 1e-3 and out["p0 q0"]["ov_static"] < 1  # a poor basis shows
    rows = bench.aggregate("w", [out, out])
    assert [r["method"] for r in rows] == list(bench.METHODS) and rows[0]["x_exact"] == 1
    assert rows[2]["x_exact"] == pytest.approx(out["exact"]["ms"] / out["p0 q0"]["ms"])


def test_exact_split_of_a_wide_weight_through_its_transpose():
    """Wide W0 (down_proj's shape) is factorised as W0ᵀ (3x faster in LAPACK); the rank-r0 part
    B0 A0 equals the one from the SVD of W0 itself (a hand check with torch.linalg.svd)."""
    w = decaying_weight(24, 80, seed=3)
    B0, A0, _ = double_lora_factors(w, 6, torch.float32)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(B0 @ A0, (U[:, :6] * S[:6]) @ Vh[:6], rtol=1e-4, atol=1e-5)
    assert B0.shape == (24, 6) and A0.shape == (6, 80)
