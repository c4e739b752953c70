"""CELoRALinear: a LoRA linear whose activation gradient approximates ``G @ W0``.

Forward is exactly LoRA's. Backward computes dA and dB exactly and dX by the
no-Ws identity of docs/design.md §1,

    dX = G[:, I] W0[I] + (G[:, Ī] B0[Ī]) A0 + s·(G B) A,

so besides W0 the layer stores only the rank-r0 factors B0 (m×r0), A0 (r0×n) and
the m row norms ‖Ws[i, :]‖² of the residual Ws = W0 − B0 A0 — never Ws itself.
The dX itself is one call of the op contract ``grad_input(G, W0, I, left, right)``
(``celora_dist/ops/amm.py``); :func:`low_rank_operands` builds its (left, right).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AUTO, EXACT, SCORE_MODES, SVDMethod, is_fraction, is_step_count, lora_scaling, num_kept
from .factors import check_r0, double_lora_factors
from .kernels import BackendChoice, grad_input, gradient_scores, implementation
from .kernels.choice import measuring_step
from .precision import autocast_off, cast, compute_dtype
from .scheduled import UNDRIVEN_BACKWARDS, ScheduledModule, graph_boundary, warn_undriven
from .selection import RelErrorMeter, complement_of, next_adaptive_k, select_indices
from .zero import gathered


@dataclass(frozen=True)
class LayerOptions:
    """A CE-LoRA linear's hyper-parameters, validated once; carried over to TP shards."""

    r: int = 14
    alpha: float = 32.0
    rslora: bool = True
    r0: int = 14
    keep: float | str = 1.0
    dropout: float = 0.0
    refresh_every: int = 200
    score: str = "gradient"
    sync_indices: bool = True
    error_budget: float = 0.3
    name: str = ""
    svd: SVDMethod = EXACT
    dense_warmup: int = 0

    def __post_init__(self) -> None:
        where = self.name or "layer"
        if not is_step_count(self.dense_warmup):
            raise ValueError(f"dense_warmup for {where} must be an integer >= 0 (optimizer steps), "
                             f"got {self.dense_warmup!r}")
        if not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"r for {where} must be an integer >= 0, got {self.r!r}")
        if self.keep != AUTO and not is_fraction(self.keep):
            raise ValueError(f"keep for {where} must be in (0, 1] or 'auto', got {self.keep!r}")
        if self.keep == AUTO and self.score != "gradient":
            raise ValueError(f"keep='auto' for {where} needs score='gradient', got {self.score!r}")
        if self.score not in SCORE_MODES:
            raise ValueError(f"score must be one of {SCORE_MODES}, got {self.score!r}")

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`CELoRALinear` that rebuild these options (shallow:
        ``svd`` stays an SVDMethod, which ``asdict`` would turn into a dict)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def needs_factors(keep: float | str, m: int) -> bool:
    """Whether a layer with this keep and m output features approximates (so needs the SVD split):
    the rule CELoRALinear applies (adaptive layers start exact but choose k later)."""
    return keep == AUTO or num_kept(keep, m) < m


def low_rank_operands(G: Tensor, lora_B: Tensor, lora_A: Tensor, scaling: float,
                      B0_dropped: Tensor | None, A0: Tensor | None, lora_in_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(s·G B, left, right) for ``grad_input(G, W0, I, left, right)`` of a CE-LoRA backward.

    ``left = G @ [s·B | B0_Ī]`` is ONE (T, r + r0) GEMM — the one LoRA needs for dA
    anyway — with B0_Ī = B0 with the kept rows zeroed, so ``G B0_Ī = G[:, Ī] B0[Ī]``
    without a (T, m − k) gather of G, a gather of B0 and a second GEMM; it costs
    2Tk·r0 FLOPs more. On CPU it took SmolLM2-135M's CE-LoRA backward from 4% slower
    than PEFT LoRA's to equal (BENCHMARKS.md, end-to-end section). ``B0_dropped``
    None (exact layers, r0 = 0): left is s·G B alone. ``lora_in_dx`` False (LoRA
    dropout: its term goes to the dropped-out input's gradient instead) leaves LoRA's
    columns out of (left, right). The first return value is s·G B, for dA. Everything
    is computed in G's dtype (the forward's compute dtype): the small factors are cast
    to it (fp32 master weights under autocast, ``celora_dist/precision.py``).
    """
    dtype = G.dtype
    lora_B, lora_A = cast(lora_B, dtype), cast(lora_A, dtype)
    r = lora_B.shape[1]
    if B0_dropped is None:
        sGB = (G @ lora_B).mul_(scaling)
        return (sGB, sGB, lora_A) if lora_in_dx else (sGB, None, None)
    A0 = cast(A0, dtype)
    left = G @ torch.cat([lora_B * scaling, cast(B0_dropped, dtype)], dim=1)
    if lora_in_dx:
        return left[:, :r], left, torch.cat([lora_A, A0], dim=0)
    return left[:, :r], left[:, r:], A0


def add_lora_output(y: Tensor, xA: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``y + s·(xA) Bᵀ``, in place as ONE ``addmm_`` over y's rows where y is contiguous.

    ``y + s * F.linear(xA, B)`` writes two (T, m) temporaries and makes three passes over
    them; the addmm reads and writes y once. Only for a y the caller owns (the forward's own
    product): it is modified.
    """
    if not y.is_contiguous():
        return y + scaling * F.linear(xA, lora_B)
    y.view(-1, y.shape[-1]).addmm_(xA.reshape(-1, xA.shape[-1]), lora_B.t(), alpha=scaling)
    return y


class _CELoRAFunction(torch.autograd.Function):
    """y = x W0ᵀ + b + s (xd Aᵀ) Bᵀ with the CE-LoRA backward.

    ``xd`` is the dropout-ed input of the LoRA branch; when it is ``x`` itself the
    LoRA term of dX is folded into the one dX GEMM. Parameters are passed and saved
    as the Parameter objects so ZeRO-3 can re-gather them for backward. The math runs
    in autocast's dtype when autocast is on (``celora_dist/precision.py``): the output
    is in that dtype, the gradients in their inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, x, xd, weight, bias, lora_A, lora_B, B0, A0, layer):
        s = layer.scaling
        dtype = compute_dtype(x)
        fused = xd is x
        xc = cast(x, dtype)
        y = layer._frozen_product(xc, weight, bias)
        with autocast_off(x):
            xdc = xc if fused else cast(xd, dtype)
            xA = F.linear(xdc, cast(lora_A, dtype))
            if layer.r:  # r = 0: the frozen linear alone (a PEFT LoRA around it adds the adapter)
                y = add_lora_output(y, xA, cast(lora_B, dtype), s)
        save_context(ctx, layer, x, xd, lora_A, lora_B, fused)
        ctx.save_for_backward(xdc, weight, lora_A, lora_B, B0, A0, xA)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        layer: CELoRALinear = ctx.layer
        dX, approx, dXd, dA, dB = local_backward(ctx, grad_out)
        dX, dA = layer._combine_backward(ctx.fused, dX, approx, dA)
        return input_grads(ctx, dX, dXd, dA, dB)


def save_context(ctx, layer: "CELoRALinear", x: Tensor, xd: Tensor, lora_A: Tensor, lora_B: Tensor,
                 fused: bool) -> None:
    """What every CE-LoRA Function's backward needs besides its saved tensors (read once)."""
    ctx.layer = layer
    ctx.fused = fused
    ctx.x_shape = x.shape
    ctx.grad_dtypes = (x.dtype, xd.dtype, lora_A.dtype, lora_B.dtype)


def input_grads(ctx, dX: Tensor | None, dXd: Tensor | None, dA: Tensor | None, dB: Tensor | None) -> tuple:
    """The Function's gradients, shaped and typed like its inputs (x, xd, ..., A, B)."""
    x_dtype, xd_dtype, a_dtype, b_dtype = ctx.grad_dtypes
    if dX is not None:
        dX = cast(dX.view(ctx.x_shape), x_dtype)
    if dXd is not None:
        dXd = cast(dXd.view(ctx.x_shape), xd_dtype)
    return dX, dXd, None, None, cast(dA, a_dtype), cast(dB, b_dtype), None, None, None


def local_backward(ctx, grad_out: Tensor):
    """Every CE-LoRA gradient of one (possibly tensor-parallel shard of a) layer.

    Returns (dX, approx, dXd, dA, dB) as 2-D tensors: dX exact on refresh steps and
    exact layers, the CE-LoRA approximation otherwise; ``approx`` the approximation
    of the indices in use on refresh steps (for telemetry), else None; dXd the LoRA
    branch's input gradient when dropout separates it from x. Refresh-step scores
    are accumulated here. Summing over a TP group is the layer's ``_combine_backward``.
    """
    xd, weight, lora_A, lora_B, B0, A0, xA = ctx.saved_tensors  # xd, xA in the compute dtype
    layer: CELoRALinear = ctx.layer
    m, n = layer.out_features, layer.in_features  # of this shard (a quantized weight is stored packed)
    G = cast(grad_out.reshape(-1, m), xA.dtype)
    need_x, need_xd, _, _, need_A, need_B = ctx.needs_input_grad[:6]

    refresh = layer.refresh_due()
    approximate = need_x and layer.selected is not None and not layer.is_exact
    backend = None  # the approximate dX backend between refreshes (docs/design.md §3, "Never slower")
    if approximate and not refresh:
        backend = layer._dx_backend(G, weight, lora_B, lora_A, B0, A0, ctx.fused)
        approximate = backend != "exact"
    # the double-LoRA term joins only approximate products (absent for r0 = 0)
    B0_dropped = layer._dropped_B0(B0) if approximate and A0.shape[0] > 0 else None
    sGB, left, right = low_rank_operands(G, lora_B, lora_A, layer.scaling, B0_dropped, A0, ctx.fused)
    dA = sGB.t() @ xd.reshape(-1, n) if need_A else None
    dB = (G.t() @ xA.reshape(-1, xA.shape[-1])).mul_(layer.scaling) if need_B else None

    if refresh:
        layer._accumulate_scores(G)
    dX = approx = dXd = None
    if need_x:
        if not approximate:
            dX = layer._frozen_dx(G, weight, None, left, right)
        else:
            estimate = layer._frozen_dx(G, weight, layer.selected, left, right, backend)
            if refresh:  # exact step: the estimate is kept only to measure its error
                lora = (sGB, cast(lora_A, sGB.dtype)) if ctx.fused else (None, None)
                dX, approx = layer._frozen_dx(G, weight, None, *lora), estimate
            else:
                dX = estimate
    if need_xd and not ctx.fused:
        dXd = sGB @ cast(lora_A, sGB.dtype)
    return dX, approx, dXd, dA, dB


class CELoRALinear(ScheduledModule, nn.Module):
    """CE-LoRA replacement of an ``nn.Linear`` (see module docstring).

    Attributes (docs/design.md §4): ``base_layer`` (frozen W0), ``lora_A`` (r×n) and
    ``lora_B`` (m×r) as ``nn.Linear`` in PEFT's shapes, ``B0``/``A0`` (frozen,
    None for exact layers), ``scaling``, ``selected`` (kept output features, None
    while the backward is exact).

    ``r = 0``: no LoRA branch of its own — the frozen linear with the CE-LoRA backward,
    for a PEFT LoRA layer to wrap as its base layer (``celora_dist/integrations``);
    PEFT's branch adds s·(G B) A to dX exactly, so the sum is the same dX as r > 0.

    ``factors`` (B0, A0, ‖Ws[i, :]‖²) and ``lora_weights`` (A, B) skip the SVD and the
    random LoRA initialisation: the tensor-parallel layers build their shards through
    this same constructor with them. Without ``factors``, ``svd`` says how the layer's
    own split is computed (exact or randomized, ``config.SVDMethod``).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int = 14,
        alpha: float = 32.0,
        rslora: bool = True,
        r0: int = 14,
        keep: float | str = 1.0,
        dropout: float = 0.0,
        refresh_every: int = 200,
        score: str = "gradient",
        sync_indices: bool = True,
        error_budget: float = 0.3,
        name: str = "",
        svd: SVDMethod = EXACT,
        dense_warmup: int = 0,
        *,
        factors: tuple[Tensor, Tensor, Tensor] | None = None,
        lora_weights: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"CELoRALinear wraps nn.Linear, got {type(base_layer).__name__} at {name!r}")
        opts = LayerOptions(r, alpha, rslora, r0, keep, dropout, refresh_every, score, sync_indices,
                            error_budget, name, svd, dense_warmup)
        m, n = base_layer.out_features, base_layer.in_features
        self.options = opts
        self.name = name
        self.in_features, self.out_features = n, m
        self.r, self.r0 = r, r0
        self.scaling = lora_scaling(alpha, r, rslora) if r else 0.0
        self.adaptive = keep == AUTO
        self.keep = keep if self.adaptive else float(keep)
        self.error_budget = error_budget
        # an adaptive layer starts at k = m (exact) and picks k on every refresh step
        self.k = m if self.adaptive else num_kept(keep, m)
        self.is_exact = not needs_factors(keep, m)
        self.refresh_every = refresh_every
        self.dense_warmup = dense_warmup
        self.score = score
        self.sync_indices = sync_indices

        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self._init_lora(base_layer.weight, lora_weights)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._init_factors(base_layer.weight, factors)
        self._init_schedule()

    def _adapter_factory(self, weight: Tensor) -> dict[str, Any]:
        """Device and dtype of a new LoRA branch: the frozen weight's."""
        return {"device": weight.device, "dtype": weight.dtype}

    def _init_lora(self, weight: Tensor, lora_weights: tuple[Tensor, Tensor] | None) -> None:
        m, n, r = self.out_features, self.in_features, self.r
        factory = self._adapter_factory(weight)
        if r == 0:  # no LoRA branch of its own (and no empty Parameters: ZeRO-3 cannot partition those)
            self.lora_A = self.lora_B = None
            return
        if lora_weights is None:
            self.lora_A = nn.Linear(n, r, bias=False, **factory)
            self.lora_B = nn.Linear(r, m, bias=False, **factory)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init
            nn.init.zeros_(self.lora_B.weight)
            return
        A, B = lora_weights
        if tuple(A.shape) != (r, n) or tuple(B.shape) != (m, r):
            raise ValueError(f"{self.name or 'layer'}: lora_weights of shapes {tuple(A.shape)}, {tuple(B.shape)}; "
                             f"expected {(r, n)}, {(m, r)}")
        self.lora_A, self.lora_B = _trainable_linear(A), _trainable_linear(B)

    def _init_factors(self, weight: Tensor, factors: tuple[Tensor, Tensor, Tensor] | None) -> None:
        if self.is_exact:
            self.register_parameter("B0", None)
            self.register_parameter("A0", None)
            self.register_buffer("ws_row_sq", None, persistent=False)
            return
        if factors is None:
            check_r0(self.r0, self.out_features, self.in_features, self.name)
            factors = self._own_factors(weight)
        B0, A0, ws_row_sq = factors
        self.B0 = nn.Parameter(B0, requires_grad=False)
        self.A0 = nn.Parameter(A0, requires_grad=False)
        self.register_buffer("ws_row_sq", ws_row_sq, persistent=False)

    def _own_factors(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The SVD split of this layer's frozen weight, computed here (no plan, no cache)."""
        with gathered([weight]):
            return double_lora_factors(weight, self.r0, weight.dtype, svd=self.options.svd)

    def _init_schedule(self) -> None:
        """The schedule state, in one place: no selection, step 0, nothing pending."""
        self.register_buffer("selected", None, persistent=False)
        self.register_buffer("complement", None, persistent=False)
        self._B0_dropped: Tensor | None = None  # see _dropped_B0
        self.step = 0  # optimizer steps seen (advanced by finish_step)
        self._pending_colsq: Tensor | None = None
        self._refresh_backwards = 0  # backwards of this refresh step: too many = nobody drives the schedule
        self.error = RelErrorMeter()  # true dX error of the indices in use, on refresh steps
        self.k_chosen_at: int | None = None  # adaptive keep: the refresh step that chose k
        self.dx_choice = BackendChoice()  # exact / torch / Triton, measured per k (kernels/choice.py)

    # -- forward ------------------------------------------------------------------
    @graph_boundary  # eager under torch.compile: the backward reads the schedule state
    def forward(self, x: Tensor) -> Tensor:
        xd = self.lora_dropout(x)
        weight = self.base_layer.weight
        if self.r:
            lora_A, lora_B = self.lora_A.weight, self.lora_B.weight
        else:  # rank-0 stand-ins: the backward's algebra stays one code path
            lora_A, lora_B = x.new_empty(0, self.in_features), x.new_empty(self.out_features, 0)
        return _CELoRAFunction.apply(x, xd, weight, self.base_layer.bias, lora_A, lora_B, self.B0, self.A0, self)

    # -- backward hooks (called from local_backward / the autograd Function) -------
    def refresh_due(self) -> bool:
        """True while the current optimizer step is a refresh step (exact backward): every
        ``refresh_every``-th step, and each step of the dense warm-up (docs/design.md §1, "Dense
        warm-up"), so the first approximate step uses indices scored on the step before it."""
        return not self.is_exact and (self.step < self.dense_warmup or self.step % self.refresh_every == 0)

    def _dx_backend(self, G: Tensor, weight: Tensor, lora_B: Tensor, lora_A: Tensor, B0: Tensor,
                    A0: Tensor, fused: bool) -> str:
        """The dX backend of an approximate step: "exact", "torch" or "triton".

        On the first approximate backward with this k (under ``CELORA_KERNEL=auto``) the
        candidates are timed on this backward's own G and weights, each as the layer would
        run it (operands included: exact needs only G·s·B, the approximation G·[s·B | B0_Ī]);
        this step still runs the device's default approximate backend, and the choice,
        made from the medians summed over the DP group, applies from the next step on.
        """
        choice, device = self.dx_choice, G.device
        choice.ensure_key(self.selected.numel())
        # without synced indices k (so whether a rank measures) is per rank: measure only on the
        # rank-independent measuring step, whose timings every rank all-reduces (pending_statistics)
        may_measure = self.sync_indices or measuring_step(self.step, self.refresh_every)
        if choice.wants_measurement(device.type, may_measure):
            B0_dropped = self._dropped_B0(B0) if A0.shape[0] > 0 else None

            def run(backend: str) -> Tensor:
                dropped = None if backend == "exact" else B0_dropped
                _, left, right = low_rank_operands(G, lora_B, lora_A, self.scaling, dropped, A0, fused)
                if backend == "exact":
                    return grad_input(G, weight, None, left, right)
                return implementation(backend)(G, weight, self.selected, left, right)

            choice.measure({b: (lambda b=b: run(b)) for b in choice.candidates(device.type)}, device)
        return choice.active(device.type)

    def _frozen_product(self, xc: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``xc W0ᵀ + b`` in xc's dtype (the compute dtype): the frozen half of the forward."""
        with autocast_off(xc):
            return F.linear(xc, cast(weight, xc.dtype), cast(bias, xc.dtype))

    def _frozen_dx(self, G: Tensor, weight: Tensor, selected: Tensor | None, left: Tensor | None,
                   right: Tensor | None, backend: str | None = None) -> Tensor:
        """``G[:, I] W0[I] + left @ right`` (``selected`` None: ``G W0 + ...``): the dX op contract
        on this layer's frozen weight, by ``backend`` (None: the dispatcher's choice)."""
        op = grad_input if backend is None else implementation(backend)
        return op(G, weight, selected, left, right)

    def _accumulate_scores(self, G: Tensor) -> None:
        colsq = gradient_scores(G)
        self._pending_colsq = colsq if self._pending_colsq is None else self._pending_colsq + colsq
        self._refresh_backwards += 1
        if self._refresh_backwards == UNDRIVEN_BACKWARDS:
            warn_undriven(self.name, self._refresh_backwards)

    def _combine_backward(self, fused: bool, dX: Tensor | None, approx: Tensor | None,
                          dA: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """Turn this process's partial gradients into the layer's (TP layers sum them) and
        record the refresh-step error. Returns (dX, dA)."""
        if dX is not None and self.refresh_due():
            self.error.add(dX, approx)
        return dX, dA

    def _dropped_B0(self, B0: Tensor) -> Tensor:
        """B0 with the rows of the kept features zeroed (so G @ it = G[:, Ī] B0[Ī]).

        Built from the backward's B0 (gathered under ZeRO-3) once per selection:
        m × r0, small. Not a buffer: it is derived state, never checkpointed.
        """
        cached = self._B0_dropped
        if cached is None or cached.device != B0.device or cached.dtype != B0.dtype:
            cached = B0.detach().clone()
            cached[self.selected] = 0
            self._B0_dropped = cached
        return cached

    # -- the schedule contract (celora_dist/scheduled.py) ---------------------------
    @property
    def pending_scores(self) -> Tensor | None:
        """‖G[:, i]‖² summed over this refresh step's backwards so far (None off refresh steps)."""
        return self._pending_colsq

    def pending_statistics(self) -> Tensor | None:
        """[refresh scores | error sums] on refresh steps, then the dX backends' measured
        medians on a measuring step (both DP-summable); None when neither is pending.
        Without ``sync_indices`` only the backend timings, as the fixed-size slot of
        ``BackendChoice.slot`` on every measuring step (so ranks agree on the backend)."""
        if not self.sync_indices:
            if self.is_exact or not measuring_step(self.step, self.refresh_every):
                return None
            return self.dx_choice.slot(self.base_layer.weight.device)
        parts = []
        if self._pending_colsq is not None:
            sums = torch.tensor([self.error.err_sq, self.error.ref_sq], dtype=torch.float32,
                                device=self._pending_colsq.device)
            parts += [self._pending_colsq, sums]
        timings = self.dx_choice.pending_statistics()
        if timings is not None:
            parts.append(timings.to(parts[0].device) if parts else timings)
        return torch.cat(parts) if parts else None

    def load_synced_statistics(self, stats: Tensor) -> None:
        if not self.sync_indices:
            self.dx_choice.load_synced_slot(stats)
            return
        if self._pending_colsq is not None:
            m = self._pending_colsq.numel()
            self._pending_colsq = stats[:m]
            self.error.err_sq, self.error.ref_sq = (float(v) for v in stats[m:m + 2])
            stats = stats[m + 2:]
        if self.dx_choice.pending_statistics() is not None:
            self.dx_choice.load_synced(stats)

    def finish_step(self) -> None:
        self.dx_choice.decide(self.step)
        if self._pending_colsq is not None:
            ref_sq = self.error.ref_sq
            self.error.finish(self.step)
            self._pending_colsq, ref_sq = finite_scores(self._pending_colsq, ref_sq, self.name, self.step)
            self.set_selected(self._next_selection(ref_sq))
            self._pending_colsq = None
            if self.adaptive:
                self.k_chosen_at = self.step
        self._refresh_backwards = 0
        self.step += 1

    def discard_step(self) -> None:
        self._pending_colsq = None
        self.error.discard()
        self.dx_choice.discard()
        self._refresh_backwards = 0

    def telemetry(self) -> dict[str, Any] | None:
        if self.is_exact:
            return None
        k, m = self._full_k_and_m()
        return {"rel_error": self.error.last, "step": self.error.last_step, "k": k, "m": m,
                "kind": "linear", "k_chosen_at": self.k_chosen_at, **self.dx_choice.telemetry()}

    def schedule_state(self) -> dict[str, Any]:
        return {"step": self.step,
                "selected": None if self.selected is None else self.selected.detach().cpu().clone(),
                "dx_backend": self.dx_choice.state()}

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.set_selected(state["selected"])
        self.dx_choice.load_state(state.get("dx_backend"))  # absent in checkpoints before 2026-12-01
        self._pending_colsq = None
        self._refresh_backwards = 0
        self.error = RelErrorMeter()
        self.k_chosen_at = None

    def _full_k_and_m(self) -> tuple[int, int]:
        """Kept and total output features of the whole layer (a column shard reports the union)."""
        return self.k, self.out_features

    def _next_selection(self, ref_sq: float) -> Tensor | None:
        """The indices for the steps until the next refresh (None: exact), from this
        refresh step's (DP-synced) scores; ``ref_sq`` = ‖dX_exact‖² of the step."""
        if self.adaptive and ref_sq > 0:
            self.k = next_adaptive_k(self._score_sq(), ref_sq, self.error_budget, self.k, self.complement,
                                     self.error.measured_at(self.step))
        return (select_indices(self._pending_colsq, self.ws_row_sq, self.k, self.score)
                if self.k < self.out_features else None)

    def _score_sq(self) -> Tensor:
        """Gradient scores ‖G[:, i]‖²·‖Ws[i, :]‖² of the pending refresh step."""
        return self._pending_colsq.to(self.ws_row_sq.device) * self.ws_row_sq

    def set_selected(self, selected: Tensor | None) -> None:
        """Install kept output features (sorted LongTensor of length k) or None for exact."""
        self._B0_dropped = None
        if selected is None:
            self.selected = self.complement = None
            if self.adaptive:
                self.k = self.out_features
            return
        device = self.base_layer.weight.device
        if self.is_exact:
            raise ValueError(f"{self.name or 'layer'} is exact (keep=1); it has no selection")
        selected = selected.to(device=device, dtype=torch.long)
        if self.adaptive:
            self.k = selected.numel()
        elif selected.numel() != self.k:
            raise ValueError(f"{self.name or 'layer'}: expected {self.k} indices, got {selected.numel()}")
        self.selected = selected
        self.complement = complement_of(selected, self.out_features)

    # -- export ---------------------------------------------------------------------
    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear with the LoRA delta s·B A folded into W0."""
        base = self.base_layer
        if not self.r:
            raise ValueError(f"{self.name or 'layer'} has no LoRA branch (r=0); merge through the PEFT model around it")
        params = [base.weight, self.lora_A.weight, self.lora_B.weight]
        with gathered(params):
            frozen, dtype = self._dense_frozen_weight()
            merged = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                               device=frozen.device, dtype=dtype)
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
            merged.weight.copy_((frozen + delta).to(dtype))
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        return merged

    def _dense_frozen_weight(self) -> tuple[Tensor, torch.dtype]:
        """(W0 in fp32, the dtype a merged weight is stored in): the frozen weight and its own dtype."""
        weight = self.base_layer.weight
        return weight.float(), weight.dtype

    def extra_repr(self) -> str:
        mode = "exact" if self.is_exact else f"keep={self.keep} (k={self.k}), r0={self.r0}"
        if self.adaptive:
            mode += f", error_budget={self.error_budget}"
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, {mode}"


_warned_nonfinite = False


def finite_scores(colsq: Tensor, ref_sq: float, name: str, step: int) -> tuple[Tensor, float]:
    """A refresh step's scores with inf/NaN made harmless, so selection always gets k indices.

    Non-finite gradients on a step the optimizer still applied (fp16 without a loss scaler,
    or a diverging run the trainer's NaN guard stops next) would otherwise make top-k return
    fewer than k indices and fail the step. NaN scores rank last, inf ones first; an unusable
    ‖dX‖² (adaptive keep) counts as unmeasured. The same rule on every rank, so the
    collectives of selection stay aligned. Warned once per process.
    """
    global _warned_nonfinite
    if bool(torch.isfinite(colsq).all()) and math.isfinite(ref_sq):
        return colsq, ref_sq
    if not _warned_nonfinite:
        _warned_nonfinite = True
        warnings.warn(f"CE-LoRA: {name or 'a layer'}: non-finite gradient scores on refresh step {step} "
                      "(inf/NaN gradients: fp16 without a loss scaler?); NaN features rank last, inf first",
                      RuntimeWarning, stacklevel=3)
    big = torch.finfo(colsq.dtype).max
    return torch.nan_to_num(colsq, nan=0.0, posinf=big, neginf=0.0), (ref_sq if math.isfinite(ref_sq) else 0.0)


def _trainable_linear(weight: Tensor) -> nn.Linear:
    """An nn.Linear (no bias) holding ``weight`` as its trainable Parameter, no random init."""
    r_out, r_in = weight.shape
    lin = nn.utils.skip_init(nn.Linear, r_in, r_out, bias=False, device=weight.device, dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=True)
    return lin


def register_zero3_params(model: nn.Module) -> None:
    """ZeRO-3: let each CELoRALinear's hooks gather the weights its Function reads.

    The CE-LoRA Function reads base_layer/lora_A/lora_B weights without calling those
    submodules, so ZeRO-3 would never gather them. Registering them as external
    parameters of the CELoRALinear makes its forward hook gather them and its
    pre-backward hook re-gather them, while their gradients keep DeepSpeed's ordinary
    per-parameter reduction hooks. (``set_z3_leaf_modules`` is not used: its
    module-level backward hook fires before the parameter gradients exist when the
    layer's input needs no gradient, e.g. q/k/v of the first block with frozen
    embeddings, and then zero-fills released parameters.) Harmless without ZeRO-3.
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for _, module in celora_layers(model):
        for child in (module.base_layer, module.lora_A, module.lora_B):
            for param in child.parameters(recurse=False) if child is not None else ():
                register_external_parameter(module, param)


def celora_layers(model: nn.Module) -> Iterator[tuple[str, CELoRALinear]]:
    """(name, layer) for every CE-LoRA linear of ``model`` (tensor-parallel ones included)."""
    for name, module in model.named_modules():
        if isinstance(module, CELoRALinear):
            yield name, module
