"""Dense warm-up (CELoRAConfig.dense_warmup, --dense-warmup; docs/design.md §1): the first W optimizer
steps run the exact dX in every approximate layer and the vocab-sparse head, each a refresh step, so
the first approximate step uses indices scored on the step before it.

References: the exact dX written out (G W0 + s (G B) A), the CE-LoRA formula in float64
(tests/test_layer.seed_formula_dx) with the indices taken as the top-k of the previous step's
written-out scores ‖G[:, i]‖·‖Ws[i]‖, and the dense head dH = G W. Tolerance fp32 1e-5 (summation
order only)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from celora_dist import CELoRAConfig, inject_celora, on_optimizer_step
from celora_dist.chunked_loss import chunked_lm_head_loss
from celora_dist.head import VocabSparseLMHead
from celora_dist.layer import celora_layers
from celora_dist.train.cli import parse_args
from celora_dist.train.errors import UsageError

from .conftest import tiny_llama
from .test_layer import FP32_TOL, make_layer, run_backward, seed_formula_dx


def test_layer_is_exact_through_the_warmup_then_uses_the_last_warmup_steps_indices():
    layer = make_layer(keep=0.5, refresh_every=4, dense_warmup=3)
    W = layer.base_layer.weight
    Ws = W.double() - layer.B0.double() @ layer.A0.double()
    g = torch.Generator().manual_seed(3)
    expected_selection = None
    for step in range(7):
        x, grad = torch.randn(6, 40, generator=g), torch.randn(6, 48, generator=g) * torch.rand(48, generator=g) ** 3
        dX, _, _ = run_backward(layer, x, grad)
        exact = grad @ W + layer.scaling * (grad @ layer.lora_B.weight) @ layer.lora_A.weight
        if step < 3 or step % 4 == 0:  # warm-up steps 0, 1, 2 and the refresh at 4
            torch.testing.assert_close(dX, exact, **FP32_TOL)
        else:  # 3, 5, 6: the approximation with the indices the last exact step chose
            assert torch.equal(layer.selected, expected_selection), step
            ref = seed_formula_dx(layer, grad, expected_selection)
            torch.testing.assert_close(dX.double(), ref, **FP32_TOL)
            assert not torch.allclose(dX, exact, rtol=1e-3, atol=1e-3), step
        if step < 3 or step % 4 == 0:
            score = grad.double().norm(dim=0) * Ws.norm(dim=1)
            expected_selection = torch.topk(score, layer.k).indices.sort().values
        on_optimizer_step(layer)


def test_zero_warmup_is_todays_schedule():
    a, b = make_layer(keep=0.5, refresh_every=3), make_layer(keep=0.5, refresh_every=3, dense_warmup=0)
    g = torch.Generator().manual_seed(4)
    for _ in range(4):
        x, grad = torch.randn(5, 40, generator=g), torch.randn(5, 48, generator=g)
        for layer in (a, b):
            assert layer.refresh_due() == (layer.step % 3 == 0)
        torch.testing.assert_close(run_backward(a, x, grad)[0], run_backward(b, x, grad)[0], rtol=0, atol=0)
        on_optimizer_step(a)
        on_optimizer_step(b)


def _head_dh(head: VocabSparseLMHead, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    nn.functional.cross_entropy(head(x), target).backward()
    return x.grad


def test_head_is_dense_through_the_warmup():
    torch.manual_seed(0)
    base = nn.Linear(16, 200, bias=False)
    warm = VocabSparseLMHead(base, keep=0.1, measure_every=200, dense_warmup=3)
    twin = VocabSparseLMHead(copy.deepcopy(base), keep=0.1, measure_every=200, dense_warmup=0)
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        x, target = torch.randn(12, 16, generator=g), torch.randint(0, 200, (12,), generator=g)
        xr = x.clone().requires_grad_(True)
        nn.functional.cross_entropy(xr @ base.weight.t(), target).backward()
        dense = xr.grad
        dh = _head_dh(warm, x, target)
        assert warm.sparse_due() == (step >= 3)
        if step < 3:
            torch.testing.assert_close(dh, dense, **FP32_TOL)
        else:  # step 3 is no measuring step (0, 1, 2, 4, ...): the top-k dH, as a head without warm-up
            torch.testing.assert_close(dh, _head_dh(twin, x, target), rtol=0, atol=0)
            assert not torch.allclose(dh, dense, rtol=1e-3, atol=1e-3)
        for head in (warm, twin):
            head.finish_step()
        twin.step = warm.step


@pytest.mark.parametrize("step,sparse", [(0, False), (1, False), (3, True)])  # 3: no measuring step
def test_chunked_loss_takes_the_dense_head_in_the_warmup(step, sparse):
    torch.manual_seed(1)
    base = nn.Linear(16, 120, bias=False)
    head = VocabSparseLMHead(base, keep=0.1, measure_every=200, dense_warmup=2)
    head.step = step
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 120, (2, 9))
    chunked_lm_head_loss(hidden, head, labels, chunk=4).backward()
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    logits = ref_hidden[:, :-1].reshape(-1, 16) @ base.weight.t()
    nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1)).backward()
    if sparse:
        assert not torch.allclose(hidden.grad, ref_hidden.grad, rtol=1e-3, atol=1e-3)
    else:
        torch.testing.assert_close(hidden.grad, ref_hidden.grad, **FP32_TOL)


def test_config_and_flag_carry_the_warmup_to_every_layer_and_the_head():
    cfg = CELoRAConfig(r=4, r0=4, dense_warmup=5, head_keep=0.2)
    assert CELoRAConfig.from_dict(cfg.to_dict()).dense_warmup == 5
    model = inject_celora(tiny_llama(), cfg, verbose=False)
    warmups = {layer.dense_warmup for _, layer in celora_layers(model)}
    assert warmups == {5}
    assert model.get_output_embeddings().dense_warmup == 5
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="dense_warmup"):
            CELoRAConfig(dense_warmup=bad)
    assert parse_args(["--dense-warmup", "6"]).celora.dense_warmup == 6
    assert parse_args([]).celora.dense_warmup == 0
    with pytest.raises(UsageError, match="--dense-warmup"):
        parse_args(["--dense-warmup", "-2"])
