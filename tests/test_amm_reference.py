"""The dX op contract ``celora_dist.ops.amm.celora_grad_input`` against the formula written out.

    dX = G[:, I] @ W0[I, :] + left @ right          (docs/design.md §1)

computed here in float64 with advanced indexing and no buffers. The op has two CPU forms (one
GEMM over operands gathered into its buffers; on one thread, gather then ``addmm_`` / cat): both
are pinned to the plain formula on odd shapes, every dtype the layer runs, a low-rank term in
another dtype than G, and the edge cases (one kept feature, every feature kept, no low-rank
term, the dense path).
"""
from __future__ import annotations

import pytest
import torch

from celora_dist.ops.amm import celora_grad_input

# relative to max|dX|: fp32 differs from fp64 by summation order only; half precision by the
# rounding of its operands and output (k + j <= 200 terms)
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """Each CPU form of the op: one intra-op thread selects the serial gather form."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _case(T, m, n, k, j, dtype, left_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt)

    selected = torch.randperm(m, generator=g)[:k].sort().values if k is not None else None
    left = rnd(T, j, dt=left_dtype or dtype) if j else None
    right = rnd(j, n) if j else None
    return rnd(T, m), rnd(m, n), selected, left, right


def _by_hand(G, W, selected, left, right):
    G, W = G.double(), W.double()
    out = G @ W if selected is None else G[:, selected] @ W[selected]
    return out if left is None else out + left.double() @ right.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,m,n,k,j", [
    (6, 42, 123, 21, 28),     # odd shapes, keep 0.5
    (37, 53, 29, 1, 5),       # one kept feature
    (64, 31, 17, 31, 3),      # every feature kept on the approximate path
    (5, 200, 9, 77, 0),       # no low-rank term (the vocab-sparse head's call)
    (9, 24, 40, None, 14),    # dense path: selected None
])
def test_grad_input_matches_formula(threads, dtype, T, m, n, k, j):
    G, W, selected, left, right = _case(T, m, n, k, j, dtype)
    out = celora_grad_input(G, W, selected, left, right)
    ref = _by_hand(G, W, selected, left, right)
    assert out.dtype == dtype and out.shape == (T, n)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=TOL[dtype] * ref.abs().max().item())


def test_low_rank_term_in_fp32_joins_a_bf16_product(threads):
    """The layer's left may come out of an fp32 GEMM while G is bf16: it is cast, not rejected."""
    G, W, selected, left, right = _case(16, 40, 24, 13, 10, torch.bfloat16, left_dtype=torch.float32)
    out = celora_grad_input(G, W, selected, left, right)
    ref = _by_hand(G, W, selected, left.to(torch.bfloat16), right)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=TOL[torch.bfloat16] * ref.abs().max().item())


def test_int32_indices_give_the_same_product(threads):
    G, W, selected, left, right = _case(8, 30, 12, 11, 6, torch.float32)
    assert torch.equal(celora_grad_input(G, W, selected.int(), left, right),
                       celora_grad_input(G, W, selected, left, right))


def test_inputs_are_not_modified(threads):
    G, W, selected, left, right = _case(8, 30, 12, 11, 6, torch.float32)
    before = [t.clone() for t in (G, W, selected, left, right)]
    celora_grad_input(G, W, selected, left, right)
    for t, b in zip((G, W, selected, left, right), before):
        assert torch.equal(t, b)


def test_shape_mismatch_names_both_shapes():
    G, W, selected, left, right = _case(8, 30, 12, 11, 6, torch.float32)
    with pytest.raises(ValueError, match=r"\(8, 30\).*\(29, 12\)"):
        celora_grad_input(G, W[:29], selected, left, right)
    with pytest.raises(ValueError, match="left"):
        celora_grad_input(G, W, selected, left, None)
