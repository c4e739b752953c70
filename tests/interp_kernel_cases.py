"""Triton kernels under the CPU interpreter against the torch reference (the spec).

Run by tests/test_kernels.py in a subprocess with TRITON_INTERPRET=1: the variable
must be set before triton itself is first imported (triton's own @jit helpers such as
tl.cdiv are decorated then), and other test modules import triton via peft first.
A subprocess also keeps interpreted kernels out of every other test.
The interpreter upcasts bf16 tiles to fp32 before ``tl.dot`` (its bf16 dot is wrong
upstream), so bf16 is tested here too; fp32/fp16 run the same code path as on GPU
(fp32 with an ieee dot: on a GPU fp32 runs only under TF32, amm_triton.kernel_supports).
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

if os.environ.get("TRITON_INTERPRET") != "1":  # never silently run compiled kernels on CPU
    raise RuntimeError("interp_kernel_cases.py needs TRITON_INTERPRET=1; run tests/test_kernels.py")

from celora_dist import CELoRALinear  # noqa: E402
from celora_dist.kernels import amm_triton, scores_triton  # noqa: E402
from celora_dist.ops.amm import celora_grad_input  # noqa: E402


@pytest.fixture(scope="module")
def kern():
    # really the interpreter: a compiled launch on CPU tensors would fail anyway
    assert amm_triton.INTERPRET and scores_triton.INTERPRET
    assert type(amm_triton._amm_kernel).__name__ == "InterpretedFunction"
    assert type(scores_triton._colsq_kernel).__name__ == "InterpretedFunction"
    return SimpleNamespace(amm=amm_triton, scores=scores_triton)


# Tolerances relative to max|dX|: fp32 differs from fp64 only by summation order over
# K <= 123 terms; fp16/bf16 by one output rounding (2^-11 / 2^-8).
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _problem(T, m, n, k, r0, r, dtype, seed=0):
    """The layer's call: G, W0, I, and the low-rank term (left, right) of width r + r0
    (the layer's left = G @ [s·B | B0_Ī], right = [A ; A0]); None when the width is 0."""
    g = torch.Generator().manual_seed(seed)
    sel = torch.randperm(m, generator=g)[:k].sort().values

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    left, right = (rnd(T, r + r0), rnd(r + r0, n)) if r + r0 else (None, None)
    return dict(grad_output=rnd(T, m), weight=rnd(m, n), selected=sel, left=left, right=right)


def _check(out, args, dtype):
    """Compare with the torch reference, in fp64 for fp32 and in the input dtype otherwise."""
    if dtype == torch.float32:
        ref = celora_grad_input(**{k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                                   for k, v in args.items()})
    else:
        ref = celora_grad_input(**args).double()
    assert out.dtype == dtype and out.shape == ref.shape
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,m,n", [(37, 53, 29), (6, 42, 123)])
@pytest.mark.parametrize("keep", ["one", "half", "all"])
def test_amm_matches_reference(kern, dtype, T, m, n, keep):
    k = {"one": 1, "half": m // 2, "all": m}[keep]  # "all": every feature kept, approximate path
    args = _problem(T, m, n, k, r0=5, r=3, dtype=dtype)
    _check(kern.amm.celora_grad_input_triton(**args), args, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,m,n,k", [(37, 53, 29, 40), (6, 130, 70, 64)])
def test_amm_half_gradient_with_fp32_weights(kern, dtype, T, m, n, k):
    """Autocast's case: G in bf16/fp16, W0, left and right fp32 (master weights). The contract:
    the fp32 operands are used as if cast to G's dtype, fp32 accumulation, output in G's dtype.

    Reference: that formula written out in fp64 from the cast operands. Tolerance: the one
    output rounding relative (half an fp16 ulp; a whole bf16 ulp, see below) plus
    (k + j)·2^-24·Σ|terms| (fp32 accumulation; products of half-precision values are exact
    in fp32). bf16 runs its tiles through fp32 in the interpreter (UPCAST) after the cast to
    bf16, and the interpreter rounds fp32 -> bf16 toward zero (its cast drops the low bits;
    a GPU rounds to nearest even): so the bf16 reference casts W0 by truncation here too, and
    the output may be a whole ulp off.
    """
    args = _problem(T, m, n, k, r0=5, r=3, dtype=torch.float32, seed=7)
    args["grad_output"] = args["grad_output"].to(dtype)
    G, W, sel, left, right = (args[name] for name in ("grad_output", "weight", "selected", "left", "right"))
    assert W.dtype == left.dtype == right.dtype == torch.float32
    out = kern.amm.celora_grad_input_triton(**args)
    assert out.dtype == dtype and out.shape == (T, n)

    def formula(cast):
        Wd = cast(W)
        Gd, Ld, Rd = (t.to(dtype).double() for t in (G, left, right))  # torch casts left/right (RNE)
        return Gd[:, sel] @ Wd[sel] + Ld @ Rd, Gd[:, sel].abs() @ Wd[sel].abs() + Ld.abs() @ Rd.abs()

    if dtype == torch.float16:
        ref, magnitude = formula(lambda t: t.half().double())
        rtol = 2.0 ** -11
    else:
        ref, magnitude = formula(lambda t: (t.view(torch.int32) & ~0xFFFF).view(torch.float32).double())
        rtol = 2.0 ** -7
    atol = (k + 8) * 2.0 ** -24 * magnitude.max().item() + 2.0 ** -24
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    # the check can tell: fp32 weights used uncast would fail it
    uncast, _ = formula(lambda t: t.double())
    assert not torch.allclose(uncast.to(dtype).double(), ref, rtol=rtol, atol=atol)


def test_amm_nothing_kept(kern):
    """k = 0: only the low-rank term (or zeros); no W0 row is read."""
    args = _problem(37, 53, 29, 0, r0=5, r=3, dtype=torch.float32, seed=8)
    assert args["selected"].numel() == 0
    _check(kern.amm.celora_grad_input_triton(**args), args, torch.float32)
    bare = dict(args, left=None, right=None)
    assert torch.equal(kern.amm.celora_grad_input_triton(**bare), torch.zeros(37, 29))


@pytest.mark.parametrize("r0,r", [(0, 3), (5, 0), (0, 0)])
def test_amm_without_double_lora_or_lora(kern, r0, r):
    args = _problem(37, 53, 29, 20, r0=r0, r=r, dtype=torch.float32, seed=1)
    _check(kern.amm.celora_grad_input_triton(**args), args, torch.float32)


def test_amm_plain_topk_without_low_rank_factors(kern):
    """left = right = None: plain G[:, I] W0[I] (the vocab-sparse LM head)."""
    args = _problem(37, 53, 29, 11, r0=0, r=0, dtype=torch.float32, seed=6)
    assert args["left"] is None and args["right"] is None
    _check(kern.amm.celora_grad_input_triton(**args), args, torch.float32)


@pytest.mark.parametrize("layout", ["column_stride", "transposed", "weight_transposed"])
def test_amm_strided_operands(kern, layout):
    args = _problem(37, 53, 29, 17, r0=5, r=3, dtype=torch.float32, seed=2)
    G, W = args["grad_output"], args["weight"]
    if layout == "column_stride":  # every other column of a wider buffer
        wide = torch.zeros(37, 106)
        wide[:, ::2] = G
        args["grad_output"] = wide[:, ::2]
    elif layout == "transposed":  # column-major G
        args["grad_output"] = G.t().contiguous().t()
    else:  # a transposed view of W0, as a tied / pre-transposed weight would be
        args["weight"] = W.t().contiguous().t()
    assert not args["grad_output"].is_contiguous() or not args["weight"].is_contiguous()
    _check(kern.amm.celora_grad_input_triton(**args), args, torch.float32)


def test_amm_exact_and_empty(kern):
    args = _problem(9, 20, 11, 10, r0=4, r=2, dtype=torch.float32, seed=3)
    exact = dict(args, selected=None)
    _check(kern.amm.celora_grad_input_triton(**exact), exact, torch.float32)  # dense fallback
    empty = dict(args, grad_output=args["grad_output"][:0], left=args["left"][:0])
    assert kern.amm.celora_grad_input_triton(**empty).shape == (0, 11)


@pytest.mark.parametrize("cfg_index", range(8))
def test_every_gpu_tile_config(kern, cfg_index):
    """Each autotune candidate computes the same product (block edges, K tails)."""
    configs = kern.amm.GPU_CONFIGS
    assert len(configs) == 8
    c = configs[cfg_index]
    cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    args = _problem(130, 97, 70, 70, r0=5, r=3, dtype=torch.float32, seed=4)
    G, W, sel = args["grad_output"], args["weight"], args["selected"]
    S = torch.randn(130, 8)
    Rs = torch.randn(8, 70)
    out = kern.amm.launch_amm(G, W, sel, S, Rs, config=cfg)
    ref = G.double()[:, sel] @ W.double()[sel] + S.double() @ Rs.double()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,m", [(75, 53), (5, 17)])
def test_scores_match_reference(kern, dtype, T, m):
    G = torch.randn(T, m, generator=torch.Generator().manual_seed(5)).to(dtype)
    out = kern.scores.gradient_scores_triton(G)
    ref = (G.double() ** 2).sum(0)  # independent: fp64 of the same (rounded) inputs
    assert out.dtype == torch.float32 and out.shape == (m,)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=0)
    strided = torch.zeros(T, 2 * m, dtype=dtype)
    strided[:, 1::2] = G
    torch.testing.assert_close(kern.scores.gradient_scores_triton(strided[:, 1::2]), out, rtol=0, atol=0)


def _layer(seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(40, 48)
    layer = CELoRALinear(base, r=6, alpha=16, r0=5, keep=0.5, refresh_every=3)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    return layer


def _dx(layer, x, grad):
    x = x.clone().requires_grad_(True)
    layer(x).backward(grad)
    return x.grad


def test_layer_through_triton(kern, monkeypatch):
    """CELoRALinear's backward via CELORA_KERNEL=triton equals the reference path."""
    from celora_dist.kernels import dispatch

    calls = {"amm": 0, "scores": 0}
    launch, colsq = kern.amm.launch_amm, kern.scores.gradient_scores_triton

    def counted_launch(*a, **kw):
        calls["amm"] += 1
        return launch(*a, **kw)

    def counted_scores(*a, **kw):
        calls["scores"] += 1
        return colsq(*a, **kw)

    monkeypatch.setattr(kern.amm, "launch_amm", counted_launch)
    monkeypatch.setattr(kern.scores, "gradient_scores_triton", counted_scores)
    x = torch.randn(3, 7, 40)
    grad = torch.randn(3, 7, 48)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("CELORA_KERNEL", backend)
        assert dispatch.kernel_backend("cpu", "grad_input") == backend
        assert dispatch.kernel_backend("cpu", "scores") == backend
        layer = _layer()
        refresh_dx = _dx(layer, x, grad)  # step 0: refresh (exact dX + scores)
        pending = layer.pending_scores.clone()
        layer.finish_step()  # selects I from the scores
        results[backend] = (refresh_dx, pending, layer.selected.clone(), _dx(layer, x, grad))
    assert calls == {"amm": 1, "scores": 1}  # the triton pass really ran both kernels
    ref, tri = results["torch"], results["triton"]
    torch.testing.assert_close(tri[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tri[1], ref[1], rtol=1e-5, atol=0)
    assert torch.equal(tri[2], ref[2])
    torch.testing.assert_close(tri[3], ref[3], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ref[3], ref[0], atol=1e-3)  # the approximate dX differs from exact


def test_auto_uses_torch_on_cpu(monkeypatch):
    from celora_dist.kernels import dispatch

    monkeypatch.setenv("CELORA_KERNEL", "auto")
    assert dispatch.kernel_backend("cpu", "grad_input") == "torch"
    assert dispatch.kernel_backend("cpu", "scores") == "torch"
    monkeypatch.setenv("CELORA_KERNEL", "bogus")
    with pytest.raises(ValueError):
        dispatch.kernel_backend("cpu")

