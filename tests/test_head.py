"""Vocab-sparse LM head against the exact backward and a hand-written top-k formula."""
from __future__ import annotations

import pytest
import torch

from celora_dist import CELoRAConfig, inject_celora, on_optimizer_step, telemetry
from celora_dist.head import VocabSparseLMHead

from .conftest import tiny_llama

SMALL = dict(r=4, r0=4, alpha=8, refresh_every=3)


def batch(seed=0):
    return torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(seed))


def grads_and_loss(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_head_keep_one_equals_exact_backward():
    ids = batch()
    ref = inject_celora(tiny_llama(), CELoRAConfig(**SMALL), verbose=False)
    sparse = inject_celora(tiny_llama(), CELoRAConfig(**SMALL, head_keep=1.0), verbose=False)
    assert isinstance(sparse.lm_head, VocabSparseLMHead) and sparse.lm_head.is_exact
    sparse.load_state_dict(ref.state_dict())
    for step in range(4):
        loss_ref, g_ref = grads_and_loss(ref, ids)
        loss_sp, g_sp = grads_and_loss(sparse, ids)
        assert loss_sp == loss_ref
        for name in g_ref:
            torch.testing.assert_close(g_sp[name], g_ref[name], rtol=1e-6, atol=1e-7, msg=name)
        on_optimizer_step(ref)
        on_optimizer_step(sparse)


def test_approximate_head_dx_is_topk_rows_of_the_step_score():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 200, bias=False)
    head = VocabSparseLMHead(base, keep=0.1, measure_every=1000)
    head.step = 1  # not a measurement step
    x = torch.randn(2, 7, 24, requires_grad=True)
    logits = head(x)
    torch.testing.assert_close(logits, base(x), rtol=0, atol=0)
    target = torch.randint(0, 200, (14,))
    G = torch.autograd.grad(torch.nn.functional.cross_entropy(logits.view(-1, 200), target), logits,
                            retain_graph=True)[0].reshape(-1, 200).double()
    logits.backward(G.view_as(logits).float())
    W = base.weight.detach().double()
    score = G.norm(dim=0) * W.norm(dim=1)
    I = torch.topk(score, 20).indices
    expected = (G[:, I] @ W[I]).view(2, 7, 24)
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(x.grad.double(), (G @ W).view(2, 7, 24), atol=1e-4)


def test_tied_embeddings_stay_tied_and_logits_bitwise_unchanged():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = batch(1)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    inject_celora(model, CELoRAConfig(**SMALL, head_keep=0.1), verbose=False)
    assert isinstance(model.lm_head, VocabSparseLMHead)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" in dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    # embeddings stay frozen: no gradient reaches them through the head or the input
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.embed_tokens.weight.grad is None


def test_head_telemetry_measures_true_error_on_measurement_steps():
    model = inject_celora(tiny_llama(), CELoRAConfig(**SMALL, head_keep=0.2), verbose=False)
    captured = {}
    head = model.lm_head
    head.register_full_backward_hook(lambda m, gin, gout: captured.update(G=gout[0], dX=gin[0]))
    ids = batch(2)
    model(input_ids=ids, labels=ids).loss.backward()  # step 0: measured, exact dX returned
    G = captured["G"].reshape(-1, 128).double()
    W = head.weight.detach().double()
    exact = G @ W
    torch.testing.assert_close(captured["dX"].reshape(-1, 64).double(), exact, rtol=1e-5, atol=1e-7)
    I = torch.topk(G.norm(dim=0) * W.norm(dim=1), head.k).indices
    expected = float((G[:, I] @ W[I] - exact).norm() / exact.norm())
    on_optimizer_step(model)
    report = telemetry(model)["lm_head"]
    assert report["rel_error"] == pytest.approx(expected, rel=1e-4)
    assert report["k"] == 26 and report["m"] == 128 and 0 < expected < 1


def test_head_keep_validation():
    with pytest.raises(ValueError, match="head_keep"):
        CELoRAConfig(head_keep=0.0)
    with pytest.raises(ValueError, match="head_keep"):
        CELoRAConfig(head_keep=2)
