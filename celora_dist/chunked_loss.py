"""The causal-LM loss of a linear LM head without the (T, V) logits (docs/design.md §5).

Hugging Face's path (``ForCausalLMLoss``) holds the logits, their fp32 upcast and the
log-softmax autograd saves for backward: three (T, V) tensors, 0.6 GB per 1,024 tokens
at SmolLM2's V = 49,152 in fp32 and growing with the sequence. Here the head's output is
only ever formed ``chunk`` tokens at a time, and the backward is computed *in the forward*,
chunk by chunk, while each chunk's logits are in hand: what autograd keeps for the backward
is dH (T, d) -- the size of the hidden states -- not the logits.

    loss  = Σ_t (logsumexp(s_t) − s_t[y_t]) / N        s_t = f(W h_t + b), f = identity or softcap
    dH_t  = g · G_t W,   G_t = (softmax(s_t) − onehot(y_t)) ⊙ f'(·) / N

with g the upstream gradient of the loss (the backward only scales dH by it). Rows whose
label is ``ignore_index`` have G_t = 0 exactly, so they never enter a chunk: the head's work
is proportional to the counted tokens (an SFT batch's answers), not to T.

Composition with the vocab-sparse head (``celora_dist/head.py``): its rows are the top-k by
‖G[:, v]‖²·‖W[v, :]‖², a sum over *every* token of the micro-batch, so no chunk can choose
them alone. Pass 1 runs the chunks for the loss and the column scores ‖G[:, v]‖²; the top-k
is chosen from the whole batch's scores; pass 2 recomputes each chunk's logits and G and
forms dH with the gathered rows: the indices and dH equal the unchunked head's (to fp32
rounding of the summation order). With the head's tail correction (``head.TailMean``, on by
default) pass 1 also sums G's columns and ORs the label mask (columns with G < 0) over the chunks,
the dropped rows' weighted mean m is formed once, and pass 2 adds c_t·m to each chunk's dH: again the
unchunked head's. Cost per micro-batch (n counted tokens, hidden d, k kept
rows), in GEMM FLOPs:

    today (logits, then the head's backward)   exact head: 4nVd      sparse head: 2nVd + 2nkd
    chunked                                    exact head: 4nVd      sparse head: 4nVd + 2nkd

so the chunked loss costs nothing extra for an exact head and one extra logits GEMM (2nVd)
for the sparse one, the recompute of pass 2; storing the logits between the passes is what
the chunking exists to avoid. A measuring step (every ``measure_every``) also forms the
exact dH per chunk and records the error the sparse one would have made, as the unchunked
head does, and trains on the exact one.

Mixed precision follows HF's path exactly: the logits come out in the dtype ``F.linear``
would give here (autocast's, else the hidden state's; ``celora_dist/precision.py``), the
loss is computed on their fp32 upcast (``ForCausalLMLoss`` calls ``logits.float()``), G is
rounded to the logits' dtype before the GEMM (what the upcast's backward does), and dH
comes back in the hidden state's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .head import TailMean, VocabSparseLMHead, column_statistics, select_rows, sparse_grad_input
from .kernels import grad_input
from .precision import autocast_off, cast, compute_dtype
from .zero import gathered_for_read, is_partitioned

IGNORE_INDEX = -100


@dataclass(frozen=True)
class _Plan:
    chunk: int
    softcap: float | None
    need_dx: bool
    need_dw: bool
    need_db: bool
    sparse: VocabSparseLMHead | None  # a head that approximates (not keep 1); None: exact backward


def _logit_grad(p: Tensor, y: Tensor, t: Tensor | None, inv_n: Tensor, dtype: torch.dtype) -> Tensor:
    """G = (p − onehot(y)) ⊙ f' / N in ``dtype`` from the softmax ``p``, in place over ``p`` (and ``t``)."""
    p[torch.arange(p.shape[0], device=p.device), y] -= 1.0
    if t is not None:  # d softcap(z)/dz = 1 − tanh²(z / cap)
        p.mul_(t.square_().neg_().add_(1.0))
    p.mul_(inv_n)
    return cast(p, dtype)


class _ChunkedHeadLoss(torch.autograd.Function):
    """Loss of the head over counted tokens; its forward also forms dH (and dW, db), see the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, n: Tensor, plan: _Plan) -> Tensor:
        dtype = compute_dtype(x)
        with autocast_off(x):
            return _ChunkedHeadLoss._run(ctx, x, weight, bias, y, n, plan, dtype)

    @staticmethod
    def _run(ctx, x, weight, bias, y, n, plan: _Plan, dtype) -> Tensor:
        w, b = cast(weight, dtype), cast(bias, dtype)
        inv_n = 1.0 / n.to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        need_grad = plan.need_dx or plan.need_dw or plan.need_db
        dx = x.new_empty(x.shape) if plan.need_dx else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if plan.need_dw else None
        db = torch.zeros(bias.shape, dtype=torch.float32, device=x.device) if plan.need_db else None
        sparse = plan.sparse if plan.need_dx else None
        correct = sparse is not None and sparse.tail_correction
        scores = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device) if sparse is not None else None
        colsum = torch.zeros_like(scores) if correct else None
        labels = torch.zeros(weight.shape[0], dtype=torch.bool, device=x.device) if correct else None
        spans = [(i, min(i + plan.chunk, x.shape[0])) for i in range(0, x.shape[0], plan.chunk)]
        lses = []

        def logits(i: int, j: int) -> tuple[Tensor, Tensor | None]:
            """The chunk's fp32 (softcapped) logits and tanh(z / cap); one (c, V) buffer without softcap."""
            s = F.linear(cast(x[i:j], dtype), w, b).float()  # HF: logits in `dtype`, the loss on their fp32 upcast
            if plan.softcap is None:
                return s, None
            t = s.div_(plan.softcap).tanh_()
            return t * plan.softcap, t

        def first_pass(i: int, j: int) -> None:
            """The chunk's loss; its gradients unless a selection has to wait for the whole batch.
            Softmax and logsumexp run in place over the logits (torch.logsumexp's temporaries held 3
            (c, V) fp32 buffers at the peak, this 1); a function, so the buffer dies on return and the
            next chunk's does not meet it."""
            s, t = logits(i, j)
            picked = s.gather(1, y[i:j, None]).squeeze(1)
            top = s.amax(dim=-1)
            e = s.sub_(top[:, None]).exp_()
            sum_e = e.sum(dim=-1)
            lse = top + sum_e.log()
            total.add_((lse - picked).sum())
            if not need_grad:
                return
            G = _logit_grad(e.div_(sum_e[:, None]), y[i:j], t, inv_n, dtype)
            if sparse is not None:
                chunk_scores, chunk_colsum, chunk_labels = column_statistics(G, correct)
                scores.add_(chunk_scores)
                if correct:
                    colsum.add_(chunk_colsum)
                    labels.logical_or_(chunk_labels)
                lses.append(lse)
                return
            if dx is not None:
                dx[i:j] = grad_input(G, w)
            if dw is not None:
                dw.add_(G.t() @ cast(x[i:j], dtype))
            if db is not None:
                db.add_(G.sum(dim=0, dtype=torch.float32))

        def second_pass(i: int, j: int, lse: Tensor, selected: Tensor, tail: TailMean | None,
                        exact: Tensor | None) -> None:
            """The chunk's G recomputed, dH with the batch's top-k rows (and exactly, on a measuring step)."""
            s, t = logits(i, j)
            G = _logit_grad(s.sub_(lse[:, None]).exp_(), y[i:j], t, inv_n, dtype)
            dx[i:j] = sparse_grad_input(G, weight, selected, tail)
            if exact is not None:
                exact[i:j] = grad_input(G, w)

        for i, j in spans:
            first_pass(i, j)
        exact = None
        if sparse is not None:
            selected = select_rows(scores, sparse.w_row_sq, sparse.k, labels)
            tail = TailMean(colsum, weight, selected, dtype) if correct else None
            exact = x.new_empty(x.shape) if sparse.measure_due() else None
            for (i, j), lse in zip(spans, lses):
                second_pass(i, j, lse, selected, tail, exact)
        ctx.sparse = sparse
        ctx.save_for_backward(dx, dw, db, exact)
        ctx.w_dtype, ctx.b_dtype = weight.dtype, None if bias is None else bias.dtype
        return total / n.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        dx, dw, db, exact = ctx.saved_tensors
        if exact is not None:  # a measuring step: record the sparse dH's error, train on the exact one
            ctx.sparse.error.add(exact * grad_loss, dx * grad_loss)
            dx = exact
        dx = None if dx is None else dx * grad_loss.to(dx.dtype)
        dw = None if dw is None else (dw * grad_loss).to(ctx.w_dtype)
        db = None if db is None else (db * grad_loss).to(ctx.b_dtype)
        return dx, dw, db, None, None, None


def _head_parts(head: nn.Module) -> tuple[Tensor, Tensor | None, VocabSparseLMHead | None]:
    if isinstance(head, VocabSparseLMHead):
        return head.weight, head.bias, head if head.sparse_due() else None
    if type(head) is nn.Linear:
        return head.weight, head.bias, None
    raise TypeError(f"chunked loss: the LM head must be an nn.Linear or a VocabSparseLMHead, got "
                    f"{type(head).__name__} (a wrapped head changes what its forward computes)")


def shifted_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """HF's shift (``ForCausalLMLoss``): position t is scored on labels[t + 1], the last position on nothing."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


@torch.compiler.disable(reason="CE-LoRA chunked loss: a host-side loop over chunks that reads the head's schedule")
def chunked_lm_head_loss(hidden: Tensor, head: nn.Module, labels: Tensor | None = None, *, chunk: int,
                         shift_labels: Tensor | None = None, num_items_in_batch: Tensor | int | None = None,
                         ignore_index: int = IGNORE_INDEX, softcap: float | None = None) -> Tensor:
    """``ForCausalLMLoss(head(hidden) [softcapped], labels)`` formed ``chunk`` tokens at a time.

    ``hidden``: (B, T, d) final hidden states; ``head``: the model's ``nn.Linear`` output
    embedding or a ``VocabSparseLMHead``; ``labels`` (B, T) are shifted as HF does, or
    ``shift_labels`` (B, T), when given, are taken as they are (``labels`` then ignored, as
    in HF). The loss is the mean over the micro-batch's non-ignored tokens, or their sum
    over ``num_items_in_batch`` when given (HF Trainer's gradient-accumulation
    normalisation). Under ZeRO-3 the head's parameters are gathered
    for the call; a trainable head under ZeRO-3 is refused (its gradient would bypass
    DeepSpeed's partitioned reduction).
    """
    if chunk < 1:
        raise ValueError(f"chunked loss: chunk must be a positive number of tokens, got {chunk!r}")
    if labels is None and shift_labels is None:
        raise ValueError("chunked loss: give labels (shifted here) or shift_labels (already shifted)")
    weight, bias, sparse = _head_parts(head)
    grad = torch.is_grad_enabled()
    need_dw = grad and weight.requires_grad
    need_db = grad and bias is not None and bias.requires_grad
    if (need_dw or need_db) and is_partitioned([weight]):
        raise ValueError("chunked loss: a trainable LM head under ZeRO-3 is not supported; freeze the head or "
                         "turn the chunked loss off")
    targets = shift_labels if shift_labels is not None else shifted_labels(labels, ignore_index)
    targets = targets.reshape(-1).to(hidden.device)
    counted = (targets != ignore_index).nonzero().squeeze(1)  # one host sync: the counted tokens' positions
    x = hidden.reshape(-1, hidden.shape[-1]).index_select(0, counted)
    y = targets.index_select(0, counted)
    if num_items_in_batch is None:
        n = torch.tensor(counted.numel(), device=hidden.device)
    else:
        n = torch.as_tensor(num_items_in_batch, device=hidden.device)
    plan = _Plan(chunk=int(chunk), softcap=softcap, need_dx=grad and x.requires_grad, need_dw=need_dw,
                 need_db=need_db, sparse=sparse)
    with gathered_for_read([weight] + ([bias] if bias is not None else [])):
        if weight.dim() != 2 or weight.numel() == 0:  # e.g. a ZeRO-3 shard still in flight for another module
            raise RuntimeError(f"chunked loss: the LM head weight is not gathered (shape {tuple(weight.shape)})")
        return _ChunkedHeadLoss.apply(x, weight, bias, y, n, plan)
