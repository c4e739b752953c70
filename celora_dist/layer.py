"""CELoRALinear: a LoRA linear whose activation gradient approximates ``G @ W0``.

Forward is exactly LoRA's. Backward computes dA and dB exactly and dX by the
no-Ws identity of DESIGN.md §1,

    dX = G[:, I] W0[I] + (G[:, Ī] B0[Ī]) A0 + s·(G B) A,

so besides W0 the layer stores only the rank-r0 factors B0 (m×r0), A0 (r0×n) and
the m row norms ‖Ws[i, :]‖² of the residual Ws = W0 − B0 A0 — never Ws itself.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AUTO, SCORE_MODES, num_kept
from .kernels import grad_input, gradient_scores
from .selection import RelErrorMeter, complement_of, next_adaptive_k, select_indices

# Row block for the one-off residual norm computation: bounds the fp32 temporary to
# _ROW_BLOCK × n instead of a full m × n copy of W0.
_ROW_BLOCK = 2048


def _gathered(params: list[Tensor], modifier_rank: int | None = None):
    """Gather ZeRO-3 partitioned parameters (no-op for ordinary tensors).

    modifier_rank=None: read only; an int: that rank's writes are broadcast back.
    """
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return nullcontext()


def double_lora_factors(weight: Tensor, r0: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD split of W0 (in fp32): B0 = U[:, :r0]√Σ, A0 = √Σ Vᵀ[:r0].

    Returns (B0, A0) in ``dtype`` and ‖Ws[i, :]‖² in fp32, where Ws = W0 − B0 A0 is
    formed with the *stored* (dtype-rounded) factors, i.e. the residual the backward
    really approximates.
    """
    w = weight.detach().float()
    m, n = w.shape
    if r0 > 0:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        root = S[:r0].sqrt()
        # contiguous: LAPACK's factors are column-major, and DeepSpeed's engine
        # broadcasts parameters as byte views, which need a unit last stride.
        B0 = (U[:, :r0] * root).to(dtype).contiguous()
        A0 = (root[:, None] * Vh[:r0]).to(dtype).contiguous()
    else:
        B0 = w.new_zeros(m, 0, dtype=dtype)
        A0 = w.new_zeros(0, n, dtype=dtype)
    B0f, A0f = B0.float(), A0.float()
    ws_row_sq = torch.empty(m, dtype=torch.float32, device=w.device)
    for start in range(0, m, _ROW_BLOCK):
        stop = min(m, start + _ROW_BLOCK)
        block = w[start:stop] - B0f[start:stop] @ A0f
        ws_row_sq[start:stop] = (block * block).sum(dim=1)
    return B0, A0, ws_row_sq


class _CELoRAFunction(torch.autograd.Function):
    """y = x W0ᵀ + b + s (xd Aᵀ) Bᵀ with the CE-LoRA backward.

    ``xd`` is the dropout-ed input of the LoRA branch; when it is ``x`` itself the
    LoRA term of dX is folded into the one dX GEMM. Parameters are passed and saved
    as the Parameter objects so ZeRO-3 can re-gather them for backward.
    """

    @staticmethod
    def forward(ctx, x, xd, weight, bias, lora_A, lora_B, B0, A0, layer):
        s = layer.scaling
        xA = F.linear(xd, lora_A)
        y = F.linear(x, weight, bias)
        y = y + s * F.linear(xA, lora_B)
        ctx.layer = layer
        ctx.fused = xd is x
        ctx.x_shape = x.shape
        ctx.save_for_backward(xd, weight, lora_A, lora_B, B0, A0, xA)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        layer: CELoRALinear = ctx.layer
        dX, approx, dXd, dA, dB = local_backward(ctx, grad_out)
        if dX is not None:
            if layer.refresh_due():
                layer.error.add(dX, approx)
            dX = dX.view(ctx.x_shape)
        if dXd is not None:
            dXd = dXd.view(ctx.x_shape)
        return dX, dXd, None, None, dA, dB, None, None, None


def local_backward(ctx, grad_out: Tensor):
    """Every CE-LoRA gradient of one (possibly tensor-parallel shard of a) layer.

    Returns (dX, approx, dXd, dA, dB) as 2-D tensors: dX exact on refresh steps and
    exact layers, the CE-LoRA approximation otherwise; ``approx`` the approximation
    of the indices in use on refresh steps (for telemetry), else None; dXd the LoRA
    branch's input gradient when dropout separates it from x. Refresh-step scores
    are accumulated here. Summing over a TP group is the caller's business.

    The complement term G[:, Ī] B0[Ī] is computed as G @ B0_Ī (B0 with the kept rows
    zeroed, cached per selection) in the SAME GEMM as LoRA's G B: one (T, r + r0)
    product instead of a (T, m − k) gather of G, a gather of B0 and a second GEMM.
    It costs 2Tk·r0 FLOPs more; on CPU it took SmolLM2-135M's CE-LoRA backward from 4%
    slower than PEFT LoRA's to equal (BENCHMARKS.md, end-to-end section).
    """
    xd, weight, lora_A, lora_B, B0, A0, xA = ctx.saved_tensors
    layer: CELoRALinear = ctx.layer
    s = layer.scaling
    m, n = weight.shape
    r = lora_B.shape[1]
    G = grad_out.reshape(-1, m)
    need_x, need_xd, _, _, need_A, need_B = ctx.needs_input_grad[:6]

    refresh = layer.refresh_due()
    approximate = need_x and layer.selected is not None and not layer.is_exact
    low_rank = approximate and A0.shape[0] > 0  # the double-LoRA term (absent for r0 = 0)
    if low_rank:
        # [s·G B | G[:, Ī] B0[Ī]] in one GEMM (rows I of B0 zeroed)
        left = G @ torch.cat([lora_B * s, layer._complement_B0(B0)], dim=1)
    else:
        left = (G @ lora_B).mul_(s)
    sGB = left[:, :r]  # s·G B: shared by dA and the LoRA part of dX
    dA = sGB.t() @ xd.reshape(-1, n) if need_A else None
    dB = (G.t() @ xA.reshape(-1, xA.shape[-1])).mul_(s) if need_B else None

    if refresh:
        layer._accumulate_scores(G)
    dX = approx = dXd = None
    if need_x:
        # the LoRA term joins dX unless dropout routes it to xd's gradient instead
        lora = (sGB, lora_A) if ctx.fused else (None, None)
        if not approximate:
            dX = grad_input(G, weight, None, None, None, None, *lora)
        else:
            if not low_rank:
                extra = lora
            elif ctx.fused:
                extra = (left, torch.cat([lora_A, A0], dim=0))
            else:
                extra = (left[:, r:], A0)
            estimate = grad_input(G, weight, layer.selected, None, None, None, *extra)
            if refresh:  # exact step: the estimate is kept only to measure its error
                dX, approx = grad_input(G, weight, None, None, None, None, *lora), estimate
            else:
                dX = estimate
    if need_xd and not ctx.fused:
        dXd = sGB @ lora_A
    return dX, approx, dXd, dA, dB


class CELoRALinear(nn.Module):
    """CE-LoRA replacement of an ``nn.Linear`` (see module docstring).

    Attributes (DESIGN.md §4): ``base_layer`` (frozen W0), ``lora_A`` (r×n) and
    ``lora_B`` (m×r) as ``nn.Linear`` in PEFT's shapes, ``B0``/``A0`` (frozen,
    None for exact layers), ``scaling``, ``selected`` (kept output features, None
    while the backward is exact).
    """

    _celora_scheduled = True  # driven by on_optimizer_step, reported by telemetry

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
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"CELoRALinear wraps nn.Linear, got {type(base_layer).__name__} at {name!r}")
        self.adaptive = keep == AUTO
        if not self.adaptive and not (0.0 < keep <= 1.0):
            raise ValueError(f"keep for {name or 'layer'} must be in (0, 1] or 'auto', got {keep!r}")
        if self.adaptive and score != "gradient":
            raise ValueError(f"keep='auto' for {name or 'layer'} needs score='gradient', got {score!r}")
        if score not in SCORE_MODES:
            raise ValueError(f"score must be one of {SCORE_MODES}, got {score!r}")
        m, n = base_layer.out_features, base_layer.in_features
        self.name = name
        self.in_features, self.out_features = n, m
        self.r, self.r0 = r, r0
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.keep = keep if self.adaptive else float(keep)
        self.error_budget = error_budget
        # an adaptive layer starts at k = m (exact) and picks k on every refresh step
        self.k = m if self.adaptive else num_kept(keep, m)
        self.is_exact = self.k == m and not self.adaptive
        self.refresh_every = refresh_every
        self.score = score
        self.sync_indices = sync_indices

        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Linear(n, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, m, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        if self.is_exact:
            self.register_parameter("B0", None)
            self.register_parameter("A0", None)
            self.register_buffer("ws_row_sq", None, persistent=False)
        else:
            if r0 >= min(m, n):
                raise ValueError(
                    f"r0={r0} must be below min(out_features, in_features)={min(m, n)} "
                    f"for {name or 'layer'} ({m}x{n})"
                )
            with _gathered([weight]):
                B0, A0, ws_row_sq = double_lora_factors(weight, r0, weight.dtype)
            self.B0 = nn.Parameter(B0, requires_grad=False)
            self.A0 = nn.Parameter(A0, requires_grad=False)
            self.register_buffer("ws_row_sq", ws_row_sq, persistent=False)
        self.register_buffer("selected", None, persistent=False)
        self.register_buffer("complement", None, persistent=False)
        self._B0_complement: Tensor | None = None  # see _complement_B0

        self.step = 0  # optimizer steps seen (advanced by on_optimizer_step)
        self._pending_colsq: Tensor | None = None
        self.error = RelErrorMeter()  # true dX error of the indices in use, on refresh steps

    # -- forward ------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        xd = self.lora_dropout(x)
        return _CELoRAFunction.apply(
            x, xd, self.base_layer.weight, self.base_layer.bias,
            self.lora_A.weight, self.lora_B.weight, self.B0, self.A0, self,
        )

    # -- schedule (called from the backward and from on_optimizer_step) ------------
    def refresh_due(self) -> bool:
        """True while the current optimizer step is a refresh step (exact backward)."""
        return not self.is_exact and self.step % self.refresh_every == 0

    def _accumulate_scores(self, G: Tensor) -> None:
        colsq = gradient_scores(G)
        self._pending_colsq = colsq if self._pending_colsq is None else self._pending_colsq + colsq

    def _finish_step(self) -> None:
        if self._pending_colsq is not None:
            ref_sq = self.error.ref_sq
            self.error.finish(self.step)
            self.set_selected(self._next_selection(ref_sq))
            self._pending_colsq = None
        self.step += 1

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
        self._B0_complement = None
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

    def _complement_B0(self, B0: Tensor) -> Tensor:
        """B0 with the rows of the kept features zeroed (so G @ it = G[:, Ī] B0[Ī]).

        Built from the backward's B0 (gathered under ZeRO-3) once per selection:
        m × r0, small. Not a buffer: it is derived state, never checkpointed.
        """
        cached = self._B0_complement
        if cached is None or cached.device != B0.device or cached.dtype != B0.dtype:
            cached = B0.detach().clone()
            cached[self.selected] = 0
            self._B0_complement = cached
        return cached

    def _load_schedule_state(self, step: int, selected: Tensor | None) -> None:
        self.step = int(step)
        self.set_selected(selected)
        self._pending_colsq = None
        self.error = RelErrorMeter()

    # -- export ---------------------------------------------------------------------
    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear with the LoRA delta s·B A folded into W0."""
        base = self.base_layer
        params = [base.weight, self.lora_A.weight, self.lora_B.weight]
        with _gathered(params):
            merged = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                               device=base.weight.device, dtype=base.weight.dtype)
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
            merged.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        return merged

    def extra_repr(self) -> str:
        mode = "exact" if self.is_exact else f"keep={self.keep} (k={self.k}), r0={self.r0}"
        if self.adaptive:
            mode += f", error_budget={self.error_budget}"
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, {mode}"
