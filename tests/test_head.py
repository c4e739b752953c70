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
    head = VocabSparseLMHead(base, keep=0.1, measure_every=1000, tail_correction=False)
    head.step = 3  # not a measurement step
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
    labels = G.amin(dim=0) < 0  # the tail correction keeps label rows first
    assert int(labels.sum()) > head.k  # more label rows than k: ties go to the lower index, and the
    score = (G.norm(dim=0) * W.norm(dim=1)).masked_fill(labels, float("inf"))  # tail weights are clamped at 0
    I = torch.sort(score, descending=True, stable=True).indices[:head.k]
    expected = float((corrected_dh(G, W, I) - exact).norm() / exact.norm())
    on_optimizer_step(model)
    report = telemetry(model)["lm_head"]
    assert report["rel_error"] == pytest.approx(expected, rel=1e-4)
    assert report["k"] == 26 and report["m"] == 128 and 0 < expected < 1


def corrected_dh(G, W, I):
    """The tail-corrected dH written out (float64): G[:, S] W[S] + c_t m, c_t = Σ_{v∉S} G[t, v],
    m = Σ_{v∉S} g_v W[v] / Σ_{v∉S} g_v with g the column sums of G (clamped at 0)."""
    dropped = torch.ones(W.shape[0], dtype=torch.bool)
    dropped[I] = False
    c = G[:, dropped].sum(dim=1)
    g = G[:, dropped].sum(dim=0).clamp_min(0)
    m = (g[:, None] * W[dropped]).sum(dim=0) / g.sum()
    return G[:, I] @ W[I] + c[:, None] * m[None, :]


def _anisotropic_head(vocab=300, d=24, seed=0):
    """A head whose rows share a common mean (as real embeddings do: SmolLM2's ‖mean row‖ is 0.68×
    the mean row norm), so the dropped tail's error is a bias along it."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(d, vocab, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(vocab, d, generator=g) + 1.5 * torch.randn(1, d, generator=g))
    return base


def _head_grad(head, x, target):
    logits = head(x)
    G = torch.autograd.grad(torch.nn.functional.cross_entropy(logits.view(-1, head.out_features), target),
                            logits, retain_graph=True)[0]
    logits.backward(G)
    return G.reshape(-1, head.out_features).double()


def test_tail_corrected_dh_is_the_written_out_formula_fp32():
    torch.manual_seed(0)
    base = _anisotropic_head()
    head = VocabSparseLMHead(base, keep=0.1, measure_every=1000)
    assert head.tail_correction  # on by default
    head.step = 3  # not a measurement step
    x = torch.randn(2, 9, 24, requires_grad=True)
    target = torch.randint(0, 300, (18,))
    G = _head_grad(head, x, target)
    W = base.weight.detach().double()
    labels = torch.zeros(300, dtype=torch.bool)
    labels[target] = True
    assert torch.equal(G.amin(dim=0) < 0, labels)
    I = torch.topk((G.norm(dim=0) * W.norm(dim=1)).masked_fill(labels, float("inf")), head.k).indices
    expected = corrected_dh(G, W, I)
    torch.testing.assert_close(x.grad.double().reshape(-1, 24), expected, rtol=1e-5, atol=1e-7)
    # the library's float64 reference of the correction term agrees with the formula above
    from celora_dist.head import tail_mean_reference
    torch.testing.assert_close(G[:, I] @ W[I] + tail_mean_reference(G, W, I), expected, rtol=1e-10, atol=1e-12)
    # summed over tokens the corrected dH is exact, the uncorrected one is not
    exact = G @ W
    torch.testing.assert_close(expected.sum(0), exact.sum(0), rtol=1e-8, atol=1e-10)
    plain = G[:, I] @ W[I]
    assert (plain.sum(0) - exact.sum(0)).norm() > 1e-3 * exact.sum(0).norm()
    assert (expected - exact).norm() < 0.5 * (plain - exact).norm()


def test_labels_are_kept_even_when_their_score_is_small():
    """A confidently predicted label has a tiny |G| column; with the correction it is still kept (its
    dropped entry would be negative and break the tail mean's convex combination), without it dropped."""
    torch.manual_seed(1)
    base = _anisotropic_head(vocab=200, d=16)
    x = 4 * torch.randn(1, 6, 16)  # sharp softmax: p_label 0.69-0.9998
    with torch.no_grad():
        target = base(x).view(-1, 200).argmax(dim=1)  # labels the model already predicts
    W = base.weight.detach().double()
    for correct in (True, False):
        head = VocabSparseLMHead(base, keep=0.05, measure_every=1000, tail_correction=correct)
        head.step = 3
        xi = x.clone().requires_grad_(True)
        G = _head_grad(head, xi, target)
        score = G.norm(dim=0) * W.norm(dim=1)
        plain = torch.topk(score, head.k).indices
        assert not set(target.tolist()) <= set(plain.tolist())  # the case is real: plain top-k drops a label
        if correct:
            I = torch.topk(score.masked_fill(G.amin(0) < 0, float("inf")), head.k).indices
            assert set(target.tolist()) <= set(I.tolist())
            expected = corrected_dh(G, W, I)
        else:
            expected = G[:, plain] @ W[plain]
        torch.testing.assert_close(xi.grad.double().reshape(-1, 16), expected, rtol=1e-5, atol=1e-8)


def test_tail_correction_under_bf16_autocast():
    """Under CPU autocast (bf16 logits and G, fp32 weight) the corrected dH matches the float64 formula
    on the same bf16 G to bf16 rounding."""
    torch.manual_seed(2)
    base = _anisotropic_head()
    head = VocabSparseLMHead(base, keep=0.1, measure_every=1000)
    head.step = 3
    x = torch.randn(2, 9, 24, requires_grad=True)
    target = torch.randint(0, 300, (18,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x)
    assert logits.dtype == torch.bfloat16
    G = torch.autograd.grad(torch.nn.functional.cross_entropy(logits.float().view(-1, 300), target), logits,
                            retain_graph=True)[0]
    logits.backward(G)
    G64, W = G.reshape(-1, 300).double(), base.weight.detach().double()
    I = torch.topk((G64.norm(dim=0) * W.norm(dim=1)).masked_fill(G64.amin(0) < 0, float("inf")), head.k).indices
    expected = corrected_dh(G64, W, I)
    got = x.grad.double().reshape(-1, 24)
    # bf16 rounding of the gathered rows and of dH itself: a few bf16 epsilons (2^-8) of the norm
    assert float((got - expected).norm() / expected.norm()) < 1e-2
    plain = G64[:, I] @ W[I]
    assert float((plain - expected).norm() / expected.norm()) > 5e-2  # the correction is far above rounding


def test_measuring_schedule_covers_short_runs():
    head = VocabSparseLMHead(torch.nn.Linear(8, 50, bias=False), keep=0.1, measure_every=200)
    due = []
    for step in range(450):
        head.step = step
        due.append(head.measure_due())
    assert [s for s, d in enumerate(due) if d] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 200, 400]


def test_head_keep_validation():
    with pytest.raises(ValueError, match="head_keep"):
        CELoRAConfig(head_keep=0.0)
    with pytest.raises(ValueError, match="head_keep"):
        CELoRAConfig(head_keep=2)
    with pytest.raises(ValueError, match="head_tail_correction"):
        CELoRAConfig(head_keep=0.1, head_tail_correction="yes")


def test_column_statistics_blocked_cpu_pass_equals_the_plain_reductions():
    """The CPU pass (three reductions per cache-sized row block) equals the one accelerators run:
    gradient_scores, G.sum(0), G.amin(0) < 0 -- over several blocks and a ragged last one."""
    from celora_dist.head import column_statistics
    from celora_dist.ops.amm import _SCORE_BLOCK_ELEMS, gradient_scores

    V = 40_000
    T = 2 * (_SCORE_BLOCK_ELEMS // V) + 3
    G = torch.softmax(torch.randn(T, V, generator=torch.Generator().manual_seed(0)), dim=-1)
    G[torch.arange(T), torch.arange(T) * 7] -= 1.0
    scores, colsum, labels = column_statistics(G, True)
    torch.testing.assert_close(scores, gradient_scores(G), rtol=1e-6, atol=0)
    torch.testing.assert_close(colsum, G.sum(dim=0), rtol=1e-5, atol=1e-9)
    assert torch.equal(labels, G.amin(dim=0) < 0) and int(labels.sum()) == T
    assert column_statistics(G, False)[1:] == (None, None)
