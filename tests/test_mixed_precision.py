"""CE-LoRA under mixed precision (docs/design.md §1, "Mixed precision"), against independent references.

References: PEFT's LoRA under the same ``torch.autocast`` (output dtype, gradients' dtypes and
values), and the CE-LoRA dX formula written out in float64 from the operands cast to the
compute dtype. CPU autocast applies the same dtype rules as CUDA autocast (RECIPES.md).

Tolerances, relative Frobenius error ``‖a − b‖ / ‖b‖``: against PEFT, where both sides round
differently in the compute dtype, bf16 3e-2, fp16 4e-3 (8 and 4 units of the dtype's
epsilon 2^-8 / 2^-11: a few roundings of products and of the output); against the float64
formula from the same cast operands, bf16 1e-2, fp16 2e-3 (the output rounding plus the
rounding of the small (T, r + r0) left operand). A dtype mismatch or a missing term is off
by O(1) (a dropped low-rank term: > 0.1 here).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from celora_dist import CELoRAConfig, for_trainer, inject_celora, on_optimizer_step
from celora_dist.head import VocabSparseLMHead
from celora_dist.layer import celora_layers
from celora_dist.selection import topk_indices

from .conftest import tiny_llama
from .test_layer import make_layer, peft_twin

HALF = (torch.bfloat16, torch.float16)
VS_PEFT = {torch.bfloat16: 3e-2, torch.float16: 4e-3}
VS_FORMULA = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((actual.detach().double() - expected).norm() / expected.norm())


def forward_backward(module, x, grad, dtype):
    """One forward under CPU autocast (backward outside it, as Trainer/accelerate do)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        y = module(x)
    y.backward(grad.to(y.dtype))
    return y, x.grad


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_exact_backward_under_autocast_equals_peft(dtype, keep):
    """keep = 1 (and the first, exact step of any keep) under autocast: PEFT's dtypes and values."""
    layer = make_layer(keep=keep)
    peft_model, proj = peft_twin(layer)
    x, grad = torch.randn(3, 5, 40), torch.randn(3, 5, 48)
    y, dX = forward_backward(layer, x, grad, dtype)
    y_ref, dX_ref = forward_backward(peft_model, x, grad, dtype)
    assert y.dtype == y_ref.dtype == dtype
    assert dX.dtype == dX_ref.dtype == torch.float32
    assert rel(y, y_ref) < VS_PEFT[dtype]
    assert rel(dX, dX_ref) < VS_PEFT[dtype]
    for ours, theirs in ((layer.lora_A.weight, proj.lora_A["default"].weight),
                         (layer.lora_B.weight, proj.lora_B["default"].weight)):
        assert ours.grad.dtype == theirs.grad.dtype == torch.float32
        assert rel(ours.grad, theirs.grad) < VS_PEFT[dtype]


def _formula_dx(layer, G: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dX = G[:, I] W0[I] + (G[:, Ī] B0[Ī]) A0 + s (G B) A in float64 from operands cast to ``dtype``."""
    def c(t):
        return t.detach().to(dtype).double()
    I, Ibar = layer.selected, layer.complement
    G = c(G.reshape(-1, layer.out_features))
    W, B0, A0 = c(layer.base_layer.weight), c(layer.B0), c(layer.A0)
    B, A = c(layer.lora_B.weight), c(layer.lora_A.weight)
    return G[:, I] @ W[I] + (G[:, Ibar] @ B0[Ibar]) @ A0 + layer.scaling * (G @ B) @ A


@pytest.mark.parametrize("dtype", HALF)
def test_approximate_dx_under_autocast_equals_formula(dtype):
    layer = make_layer(keep=0.5, refresh_every=3)
    x = torch.randn(4, 6, 40)
    forward_backward(layer, x, torch.randn(4, 6, 48), dtype)  # refresh step: exact, scores
    on_optimizer_step(layer)
    assert layer.selected is not None and not layer.refresh_due()
    grad = torch.randn(4, 6, 48)
    y, dX = forward_backward(layer, x, grad, dtype)
    assert y.dtype == dtype and dX.dtype == torch.float32
    expected = _formula_dx(layer, grad.to(dtype), dtype)
    assert rel(dX.reshape(expected.shape), expected) < VS_FORMULA[dtype]
    # the same formula without the double-LoRA term misses by far more than the tolerance
    assert rel(dX.reshape(expected.shape), _no_double_lora(layer, grad, dtype)) > 10 * VS_FORMULA[dtype]


def _no_double_lora(layer, grad, dtype):
    def c(t):
        return t.detach().to(dtype).double()
    G = c(grad.to(dtype).reshape(-1, layer.out_features))
    I = layer.selected
    return (G[:, I] @ c(layer.base_layer.weight)[I]
            + layer.scaling * (G @ c(layer.lora_B.weight)) @ c(layer.lora_A.weight))


@pytest.mark.parametrize("dtype", HALF)
def test_half_weights_without_autocast(dtype):
    """bf16/fp16 weights, no autocast: keep = 1 as PEFT on the same half model, approximate as the formula."""
    exact = make_layer(keep=1.0, dtype=dtype)
    peft_model, proj = peft_twin(exact)
    peft_model.to(dtype)
    x, grad = torch.randn(3, 5, 40, dtype=dtype), torch.randn(3, 5, 48, dtype=dtype)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    y, y_ref = exact(xs[0]), peft_model(xs[1])
    y.backward(grad)
    y_ref.backward(grad)
    assert y.dtype == y_ref.dtype == dtype and xs[0].grad.dtype == dtype
    assert rel(y, y_ref) < VS_PEFT[dtype] and rel(xs[0].grad, xs[1].grad) < VS_PEFT[dtype]
    assert exact.lora_A.weight.grad.dtype == dtype
    assert rel(exact.lora_A.weight.grad, proj.lora_A["default"].weight.grad) < VS_PEFT[dtype]

    approx = make_layer(keep=0.5, refresh_every=3, dtype=dtype)
    approx(x.clone().requires_grad_(True)).backward(grad)
    on_optimizer_step(approx)
    xa = x.clone().requires_grad_(True)
    approx(xa).backward(grad)
    expected = _formula_dx(approx, grad, dtype)
    assert rel(xa.grad.reshape(expected.shape), expected) < VS_FORMULA[dtype]


@pytest.mark.parametrize("dtype", HALF)
def test_vocab_sparse_head_under_autocast(dtype):
    """Logits in the autocast dtype, exact head = autocast nn.Linear, sparse dH = the top-k formula."""
    torch.manual_seed(0)
    V, d = 96, 24
    plain = nn.Linear(d, V, bias=False)
    x, grad = torch.randn(2, 7, d), torch.randn(2, 7, V)
    logits_ref, dH_ref = forward_backward(plain, x, grad, dtype)
    exact = VocabSparseLMHead(copy.deepcopy(plain), keep=1.0)
    logits, dH = forward_backward(exact, x, grad, dtype)
    assert logits.dtype == logits_ref.dtype == dtype and dH.dtype == dH_ref.dtype == torch.float32
    assert rel(logits, logits_ref) < VS_PEFT[dtype] and rel(dH, dH_ref) < VS_PEFT[dtype]

    # the plain top-k formula (a random G has no softmax structure for the tail correction to use;
    # tests/test_head.py checks the corrected dH under bf16 autocast)
    sparse = VocabSparseLMHead(copy.deepcopy(plain), keep=0.25, measure_every=100, tail_correction=False)
    sparse.step = 3  # not a measurement step: the backward is the approximation
    _, dH = forward_backward(sparse, x, grad, dtype)
    G = grad.to(dtype).reshape(-1, V)
    I = topk_indices((G.float() ** 2).sum(0) * (plain.weight.float() ** 2).sum(1), sparse.k)
    expected = G.double()[:, I] @ plain.weight.detach().to(dtype).double()[I]
    assert dH.dtype == torch.float32
    assert rel(dH.reshape(expected.shape), expected) < VS_FORMULA[dtype]


def _train_steps(model, dtype, steps=6, autocast=True):
    """A few optimizer steps on one batch, under autocast or on half weights; per step:
    (refresh, approximate, loss). Half weights train with SGD: AdamW's eps = 1e-8 is 0 in fp16
    (pure-fp16 AdamW diverges for PEFT's LoRA alike)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2) if autocast else torch.optim.SGD(params, lr=0.1)
    grad_dtype = torch.float32 if autocast else dtype
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    layer = [m for _, m in celora_layers(model) if not m.is_exact][-1]
    record = []
    for _ in range(steps):
        refresh, approximate = layer.refresh_due(), layer.selected is not None and not layer.refresh_due()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = model(input_ids=ids, labels=ids)
        assert out.logits.dtype == dtype
        out.loss.backward()
        assert all(p.grad.dtype == p.dtype for p in params)
        opt.step()
        opt.zero_grad()
        on_optimizer_step(model)
        record.append((refresh, approximate, float(out.loss)))
    return record


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("how", ["inject_celora", "for_trainer"])
def test_models_train_under_autocast_with_refresh_and_approximate_steps(how, dtype):
    cfg = CELoRAConfig(r=4, alpha=8, r0=4, refresh_every=2, head_keep=0.5)
    model = tiny_llama()
    if how == "inject_celora":
        inject_celora(model, cfg, verbose=False)
    else:
        model, _ = for_trainer(model, cfg, verbose=False, factor_cache=None)
    _check_trains(_train_steps(model, dtype))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("how", ["inject_celora", "for_trainer"])
def test_models_with_half_weights_train_without_autocast(how, dtype):
    cfg = CELoRAConfig(r=4, alpha=8, r0=4, refresh_every=2, head_keep=0.5)
    model = tiny_llama().to(dtype)
    if how == "inject_celora":
        inject_celora(model, cfg, verbose=False)
    else:  # PEFT keeps its adapter weights in fp32 over a half base (autocast_adapter_dtype)
        model, _ = for_trainer(model, cfg, verbose=False, factor_cache=None)
    _check_trains(_train_steps(model, dtype, autocast=False))


def _check_trains(record):
    assert [r for r, _, _ in record] == [True, False] * 3
    assert all(a for r, a, _ in record if not r)  # every step between refreshes approximated
    losses = [loss for _, _, loss in record]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.1


def _fp16_scaled_run(overflow_at: int | None, steps: int = 5):
    """AdamW behind accelerate's AcceleratedOptimizer with a CPU GradScaler (HF ``fp16=True``),
    driven by the Trainer callback; an extra overflowing step (loss × inf) before step
    ``overflow_at``. Returns (schedule state, LoRA weights, what the overflowing step left)."""
    from accelerate.optimizer import AcceleratedOptimizer

    from celora_dist import celora_state_dict
    from celora_dist.integrations.hf_trainer import CELoRACallback

    torch.manual_seed(0)
    model = inject_celora(tiny_llama(), CELoRAConfig(r=4, alpha=8, r0=4, refresh_every=2), verbose=False).train()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AcceleratedOptimizer(torch.optim.AdamW(params, lr=1e-2), scaler=scaler)
    callback = CELoRACallback(model)
    layer = [m for _, m in celora_layers(model) if not m.is_exact][-1]
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 16), generator=g) for _ in range(steps)]
    seen = {}

    def step(ids, factor=1.0):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(input_ids=ids, labels=ids).loss * factor
        scaler.scale(loss).backward()
        if factor != 1.0:
            seen["refresh"] = layer.refresh_due()
            seen["finite_scores"] = bool(torch.isfinite(layer.pending_scores).all())
        opt.step()
        if factor != 1.0:
            seen["skipped"] = opt.step_was_skipped
        opt.zero_grad()
        callback.on_optimizer_step(None, None, None, optimizer=opt)

    for i, ids in enumerate(batches):
        if i == overflow_at:
            step(ids, factor=float("inf"))
        step(ids)
    return celora_state_dict(model), [p.detach().clone() for p in params], seen


def test_fp16_loss_scaler_skipped_step_does_not_advance_or_corrupt_the_schedule():
    """HF ``fp16=True``: a step the scaler skips (inf/NaN grads) leaves the CE-LoRA schedule as if
    it never happened — its inf scores are dropped and the refresh step is repeated."""
    from accelerate import Accelerator

    Accelerator(cpu=True)  # AcceleratedOptimizer reads the accelerator state
    clean_state, clean_weights, _ = _fp16_scaled_run(None)
    state, weights, seen = _fp16_scaled_run(overflow_at=2)
    assert seen == {"refresh": True, "finite_scores": False, "skipped": True}  # the hazard was real
    for name, entry in clean_state.items():
        assert state[name]["step"] == entry["step"] == 5, name
        if entry["selected"] is None:
            assert state[name]["selected"] is None, name
        else:
            assert torch.equal(state[name]["selected"], entry["selected"]), name
    # gradients scaled by 2^8 and 2^7 unscale to the same values (powers of two are exact in fp16
    # but for subnormals), so AdamW takes the same steps
    for a, b in zip(weights, clean_weights):
        assert rel(a, b) < 1e-3


def test_non_finite_refresh_scores_still_select_k_features():
    """inf/NaN gradients on a refresh step (fp16 without a scaler) must not break selection:
    NaN features rank last, inf first, one warning."""
    import celora_dist.layer as layer_module

    layer = make_layer(keep=0.5, refresh_every=3)
    grad = torch.randn(4, 48)
    grad[0, 3], grad[1, 7] = float("nan"), float("inf")
    layer_module._warned_nonfinite = False
    layer(torch.randn(4, 40, requires_grad=True)).backward(grad)
    with pytest.warns(RuntimeWarning, match="non-finite gradient scores"):
        on_optimizer_step(layer)
    assert layer.selected.numel() == layer.k
    assert 7 in layer.selected.tolist() and 3 not in layer.selected.tolist()
