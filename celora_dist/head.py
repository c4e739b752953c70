"""Vocab-sparse LM-head backward: CE-LoRA's approximate dX for the frozen output projection.

The head (vocab V × hidden d, frozen, often tied to the embedding) pays a dense
``dH = G_logits @ W_head`` in every backward. The logit gradient (softmax − one-hot)
is heavy-tailed over the vocabulary, so keeping the top-k vocabulary rows by
``‖G[:, v]‖·‖W[v, :]‖`` loses little (docs/design.md §5: ~8% relative error at 10% of
the rows on SmolLM2-135M, where down_proj at keep 0.65 gives ~43%).

Selection is per step, from the current backward's own G: the logit gradient is
already in hand, scoring it is one O(T·V) pass (about 1/d of the dense product it
replaces), so no refresh lag or cross-rank sync is needed and each rank selects
from its own batch. Measured (CPU, T = 512, V = 49,152, d = 576, keep 0.1): score pass
8 ms + top-k ~2 ms + gathers and GEMM ~31 ms, against 190 ms for the dense dX. Scoring
every τ steps instead would save at most that fifth of the sparse backward, at the
price of stale rows and a DP all-reduce of V scores; per-step scoring was kept.
Every ``measure_every`` optimizer steps (and at steps 1, 2, 4, 8, ... below it, so a
short run is measured after training has moved the model, not only on the untrained one)
the backward is exact and the error the approximation would have made is recorded.

Tail correction (on by default, ``tail_correction``): the dropped rows' share
``Σ_{v∉S} G[t, v] W[v]`` is not zero-mean noise. Embedding matrices are anisotropic (SmolLM2's
rows share a mean of 0.68× their norm) and a dropped row's G[t, v] = p[t, v]/N > 0, so the
error is ≈ −(tail mass)·(mean tail row) at every counted token of every step: measured on
PIQA, error vectors of different tokens had cosine 0.96 and the LoRA gradient's error was
19% where dH's was 4.2% (keep 0.1; BENCHMARKS.md "Vocab-sparse head: why its error did not
predict its accuracy cost"). The correction adds ``c_t · m`` with c_t = Σ_{v∉S} G[t, v] (the
token's dropped gradient mass) and m = Σ_{v∉S} g_v W[v] / Σ_{v∉S} g_v, g = the column sums of G
(the dropped rows' mean, weighted by this batch's gradient mass on them); summed over tokens
the corrected dH is then exact. Label columns (G < 0) are always kept, so every dropped G is
≥ 0 and m is a convex combination of dropped rows. Cost: the column sums and minima beside the
scores (on CPU one blocked read of G for both), one (T, V)·V GEMV for c and one V·d GEMV for m;
1 CPU thread, T = 512, V = 49,152, keep 0.1: the sparse dH 51–57 → 79–85 ms (dense 162–187 ms).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import is_fraction, is_step_count, num_kept
from .kernels import grad_input, gradient_scores
from .ops.amm import fp32_row_blocks
from .precision import autocast_off, cast, compute_dtype
from .scheduled import ScheduledModule, graph_boundary
from .selection import RelErrorMeter, topk_indices
from .zero import gathered


def column_statistics(G: Tensor, tail_correction: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(‖G[:, v]‖², Σ_t G[t, v], any G[t, v] < 0) over a (T, V) logit gradient, in fp32 / bool.

    The last two only with ``tail_correction`` (None otherwise); all three are sums / ORs over
    tokens, so the chunked loss accumulates them chunk by chunk and selects as this head does."""
    scores = gradient_scores(G)  # the kernel dispatch's choice (Triton on GPU), as without the correction
    if not tail_correction:
        return scores, None, None
    if G.device.type != "cpu":
        return scores, G.sum(dim=0, dtype=torch.float32), G.amin(dim=0) < 0
    # CPU: both reductions per cache-sized row block of G, one more read of G from memory
    V = G.shape[1]
    colsum = torch.zeros(V, dtype=torch.float32, device=G.device)
    colmin = torch.full((V,), float("inf"), dtype=torch.float32, device=G.device)
    for g in fp32_row_blocks(G):
        colsum.add_(g.sum(dim=0))
        torch.minimum(colmin, g.amin(dim=0), out=colmin)
    return scores, colsum, colmin < 0


def select_rows(scores: Tensor, w_row_sq: Tensor, k: int, labels: Tensor | None) -> Tensor:
    """Top-k rows by ‖G[:, v]‖²·‖W[v]‖²; rows in ``labels`` (a bool mask: columns where G < 0,
    i.e. some token's label) first, so the dropped G is never negative."""
    score = scores * w_row_sq
    if labels is not None:
        score = score.masked_fill(labels, float("inf"))
    return topk_indices(score, k)


class TailMean:
    """The correction ``c_t · m`` of the rows a selection drops (module docstring, "Tail correction").

    Built once per micro-batch from the batch's column sums of G; :meth:`of` applies it to any
    subset of the batch's rows of G (a chunk), so the chunked loss and the head agree."""

    def __init__(self, colsum: Tensor, weight: Tensor, selected: Tensor, dtype: torch.dtype) -> None:
        dropped = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        dropped[selected] = False
        # clamp: with every label kept the dropped sums are >= 0 already; where a batch has more
        # label columns than k the weights stay those of a convex combination of dropped rows
        g = colsum.clamp_min(0.0).masked_fill_(~dropped, 0.0)
        mass = g.sum().clamp_min(torch.finfo(torch.float32).tiny)  # no host sync; no mass: m = 0
        # m = Σ g_v W[v] / Σ g_v: a V·d GEMV in the weight's own dtype (no fp32 copy of a bf16 head)
        self.row = torch.mv(weight.t(), g.to(weight.dtype)).float() / mass
        self.dropped = dropped.to(dtype)

    def of(self, G: Tensor) -> Tensor:
        """(T, d) fp32: c_t · m with c_t = Σ_{v∉S} G[t, v]."""
        return torch.outer(torch.mv(G, self.dropped).float(), self.row)


def tail_mean_reference(G: Tensor, weight: Tensor, selected: Tensor) -> Tensor:
    """Torch reference of :class:`TailMean` written from its formula in float64, for tests."""
    G, W = G.double(), weight.double()
    dropped = torch.ones(W.shape[0], dtype=torch.bool)
    dropped[selected] = False
    c = G[:, dropped].sum(dim=1)
    g = G[:, dropped].sum(dim=0).clamp_min(0)
    return c[:, None] * (g @ W[dropped])[None] / g.sum()


def sparse_grad_input(G: Tensor, weight: Tensor, selected: Tensor, tail: TailMean | None) -> Tensor:
    """``G[:, S] W[S]`` plus the tail correction when given: the head's approximate dH."""
    dH = grad_input(G, weight, selected)
    return dH if tail is None else dH.add_(tail.of(G).to(dH.dtype))


class _VocabSparseHeadFunction(torch.autograd.Function):
    """Exact logits, top-k-row dH. Under autocast the logits come out in autocast's dtype and
    dH in the hidden state's (``celora_dist/precision.py``); the frozen weight is saved as is
    and only its gathered rows are cast in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, head):
        dtype = compute_dtype(x)
        ctx.head = head
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.save_for_backward(weight)
        with autocast_off(x):
            return F.linear(cast(x, dtype), cast(weight, dtype), cast(bias, dtype))

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (weight,) = ctx.saved_tensors
        head: VocabSparseLMHead = ctx.head
        G = grad_out.reshape(-1, weight.shape[0])
        if not head.sparse_due():
            dH = grad_input(G, weight)
        else:
            scores, colsum, labels = column_statistics(G, head.tail_correction)
            selected = select_rows(scores, head.w_row_sq, head.k, labels)
            tail = TailMean(colsum, weight, selected, G.dtype) if head.tail_correction else None
            dH = sparse_grad_input(G, weight, selected, tail)
            if head.measure_due():
                exact = grad_input(G, weight)
                head.error.add(exact, dH)
                dH = exact
        return cast(dH.view(ctx.x_shape), ctx.x_dtype), None, None, None


class VocabSparseLMHead(ScheduledModule, nn.Linear):
    """Drop-in for a frozen LM head ``nn.Linear``: exact forward, top-k-row backward.

    It *shares* the head's weight Parameter (and keeps the name ``weight``), so a head
    tied to the input embedding stays tied and checkpoints keep their keys.
    """

    def __init__(self, head: nn.Linear, keep: float, measure_every: int = 200, tail_correction: bool = True,
                 dense_warmup: int = 0) -> None:
        nn.Module.__init__(self)
        if not isinstance(head, nn.Linear):
            raise TypeError(f"VocabSparseLMHead wraps nn.Linear, got {type(head).__name__}")
        if not is_fraction(keep):
            raise ValueError(f"head_keep must be in (0, 1], got {keep!r}")
        if measure_every < 1:
            raise ValueError(f"measure_every must be a positive integer, got {measure_every!r}")
        if not is_step_count(dense_warmup):
            raise ValueError(f"dense_warmup must be an integer >= 0 (optimizer steps), got {dense_warmup!r}")
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight = head.weight
        self.bias = head.bias
        self.weight.requires_grad_(False)
        self.keep = float(keep)
        self.k = num_kept(keep, self.out_features)
        self.is_exact = self.k == self.out_features
        self.measure_every = measure_every
        self.tail_correction = bool(tail_correction)
        self.dense_warmup = dense_warmup
        with torch.no_grad(), gathered([self.weight]):
            w = self.weight.float()
            self.register_buffer("w_row_sq", (w * w).sum(dim=1), persistent=False)
        self.step = 0
        self.error = RelErrorMeter()

    @graph_boundary  # eager under torch.compile: the backward reads the step counter
    def forward(self, x: Tensor) -> Tensor:
        return _VocabSparseHeadFunction.apply(x, self.weight, self.bias, self)

    def sparse_due(self) -> bool:
        """Whether this step's dH is the top-k one: not an exact head, not in the dense warm-up."""
        return not self.is_exact and self.step >= self.dense_warmup

    def measure_due(self) -> bool:
        """Every ``measure_every`` steps, and at 1, 2, 4, 8, ... below it: a 60-step run at
        measure_every 200 measures at 0, 1, 2, 4, 8, 16, 32 instead of at 0 alone (each such
        step costs one dense dH GEMM more and trains on the exact dH)."""
        s = self.step
        return s % self.measure_every == 0 or (s < self.measure_every and (s & (s - 1)) == 0)

    # -- the schedule contract (celora_dist/scheduled.py): per-step selection from the
    # step's own G, so nothing is synced over data-parallel ranks and no index is kept
    def pending_statistics(self) -> Tensor | None:
        return None

    def load_synced_statistics(self, stats: Tensor) -> None:
        raise RuntimeError("VocabSparseLMHead has no statistics to sync (it selects per step)")

    def finish_step(self) -> None:
        self.error.finish(self.step)
        self.step += 1

    def discard_step(self) -> None:
        self.error.discard()

    def telemetry(self) -> dict[str, Any] | None:
        if self.is_exact:
            return None
        return {"rel_error": self.error.last, "step": self.error.last_step, "k": self.k,
                "m": self.out_features, "kind": "lm_head", "k_chosen_at": None}

    def schedule_state(self) -> dict[str, Any]:
        return {"step": self.step, "selected": None}

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.error = RelErrorMeter()

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, vocab={self.out_features}, keep={self.keep} (k={self.k}), "
                f"tail_correction={self.tail_correction}")


def sparsify_lm_head(model: nn.Module, keep: float, measure_every: int = 200,
                     tail_correction: bool = True, dense_warmup: int = 0) -> VocabSparseLMHead:
    """Replace ``model``'s output embedding (HF ``get_output_embeddings``) in place."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (get_output_embeddings) to sparsify")
    if isinstance(head, VocabSparseLMHead):
        raise ValueError("the LM head is already vocab-sparse")
    sparse = VocabSparseLMHead(head, keep, measure_every, tail_correction, dense_warmup)
    model.set_output_embeddings(sparse)
    return sparse
