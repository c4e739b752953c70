"""Tensor-parallel CE-LoRA linears (docs/design.md §2).

Column-parallel (q/k/v/gate/up): TP rank t owns output rows [t·m/tp, (t+1)·m/tp) of
W0, bias, B0 and LoRA B; LoRA A and A0 are replicated. Input x is replicated and the
output stays sharded (Megatron ``gather_output=False``). Each rank scores and selects
ceil(keep·m/tp) of ITS rows; its partial

    dX_t = G_t[:, I_t] W0_t[I_t] + (G_t[:, Ī_t] B0_t[Ī_t]) A0 + s (G_t B_t) A

sums over TP to the CE-LoRA dX of the full layer with I = ∪ I_t — the same
all-reduce plain column parallelism needs. Adaptive keep instead chooses k over
all shards' scores (one all-gather per refresh) and each rank keeps its rows of
that global top-k, so the union is what one process would choose. A is replicated
but each rank sees only its G rows, so dA = s Σ_t (G_t B_t)ᵀ x is summed over TP in
the same collective.

Row-parallel (o/down): rank t owns input columns [t·n/tp, ...) of W0, A0 and LoRA A;
bias, B0 and LoRA B are replicated. The forward all-reduces [x_t W0_tᵀ | x_t A_tᵀ]
in ONE collective (the full xA is needed for dB anyway); G is then replicated, so the
backward needs no communication. ‖Ws[i, :]‖² is a sum over column shards
(all-reduced once at construction) and every TP rank selects the identical I;
the selection is additionally broadcast from the TP group's first rank so floating
point noise in upstream collectives can never split the group.

This LoRA sharding is Megatron's / NeMo's (A full, B split for column; A split, B
full for row): every LoRA FLOP is either sharded or tiny (r columns), and the
adapter gathers back to PEFT shapes by one concatenation per tensor.

Both classes subclass :class:`CELoRALinear` and are built by its own constructor
(from the shards of the full layer's factors and LoRA weights), so they share its
refresh schedule, selection, telemetry and checkpoint state (the
:class:`~celora_dist.scheduled.ScheduledModule` contract) and its autograd Function;
they override only what differs: how the shards are cut, the TP collective of the
backward (``_combine_backward``), the row layer's forward all-reduce and its
TP-wide selection. ``celora_dist.on_optimizer_step(model, dp_group)`` drives them
unchanged. Pass the DATA-parallel group there: with TP the world group would mix
score vectors of different column shards.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import num_kept
from ..factors import residual_row_sq
from ..layer import CELoRALinear, _CELoRAFunction, add_lora_output, save_context
from ..precision import autocast_off, cast, compute_dtype
from ..scheduled import graph_boundary
from ..selection import next_adaptive_k, topk_indices
from ..zero import is_partitioned
from .comm import ReduceGradOverTP, all_gather_cat, all_reduce_many, broadcast_, group_rank, group_size


def _own(t: Tensor) -> Tensor:
    """A detached, contiguous copy. SVD factors come out column-major (LAPACK), and
    DeepSpeed's parameter broadcast views parameters as bytes, which needs stride 1."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def _mark_sharded(params: list[Tensor | None], dim: int) -> None:
    """Tag TP-sharded parameters the Megatron way. DeepSpeed's gradient-norm code
    (clipping) counts a parameter on every TP rank only when it carries
    ``tensor_model_parallel``; untagged (replicated) ones are counted on TP rank 0."""
    for p in params:
        if p is not None:
            p.tensor_model_parallel = True
            p.partition_dim = dim
            p.partition_stride = 1


def _frozen_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.utils.skip_init(nn.Linear, in_f, out_f, bias=bias is not None, device=weight.device,
                             dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


class _RowFunction(_CELoRAFunction):
    """y = allreduce(x_t W0_tᵀ, x_t A_tᵀ) → y + b + s (xA) Bᵀ; the backward is the base
    class's, rank-local (G is replicated over the TP group)."""

    @staticmethod
    def forward(ctx, x, xd, weight, bias, lora_A, lora_B, B0, A0, layer):
        s = layer.scaling
        dtype = compute_dtype(x)  # autocast's rule, as in the base class
        fused = xd is x
        with autocast_off(x):
            xc = cast(x, dtype)
            xdc = xc if fused else cast(xd, dtype)
            done = all_reduce_many({"y": F.linear(xc, cast(weight, dtype)),
                                    "xA": F.linear(xdc, cast(lora_A, dtype))}, layer.tp_group)
            y, xA = done["y"], done["xA"].clone()  # saved: must not pin the T×m buffer
            if bias is not None:
                y = y + cast(bias, dtype)
            y = add_lora_output(y, xA, cast(lora_B, dtype), s)  # in place: y is this forward's own buffer
        save_context(ctx, layer, x, xd, lora_A, lora_B, fused)
        ctx.save_for_backward(xdc, weight, lora_A, lora_B, B0, A0, xA)
        return y


class _TPCELoRALinear(CELoRALinear):
    """Common construction: factor the FULL W0 once, agree across TP, keep the shard.

    Built from a full ``nn.Linear`` (with CELoRALinear keyword arguments) or from a
    full ``CELoRALinear`` (its SVD factors and LoRA values are reused). The TP
    group's first rank broadcasts B0, A0, A and B before sharding, so all ranks
    shard one factorisation and one LoRA initialisation even if their SVDs or
    random seeds differed. The shard is then built by CELoRALinear's own
    constructor. The schedule step carries over; a selection does not (the layer
    runs exact until its next refresh step).
    """

    parallel_mode = ""

    def __init__(self, source: nn.Linear | CELoRALinear, tp_group: Any, **celora_kwargs: Any) -> None:
        if isinstance(source, _TPCELoRALinear):
            raise TypeError(f"{source.name or 'layer'} is already tensor parallel")
        if isinstance(source, CELoRALinear):
            if celora_kwargs:
                raise TypeError(f"options {sorted(celora_kwargs)} apply to nn.Linear sources only; "
                                "a CELoRALinear brings its own")
            full = source
        elif isinstance(source, nn.Linear):
            full = CELoRALinear(source, **celora_kwargs)
        else:
            raise TypeError(f"expected nn.Linear or CELoRALinear, got {type(source).__name__}")
        if is_partitioned(full.parameters()):
            raise ValueError("tensor-parallel CE-LoRA does not support ZeRO-3 partitioned weights "
                             "(DeepSpeed TP trains with ZeRO stages 0-2)")
        with torch.no_grad():
            factors = [] if full.is_exact else [full.B0.data, full.A0.data]
            lora = [full.lora_A.weight.data, full.lora_B.weight.data]
            broadcast_(factors + lora, tp_group)
        tp_size, tp_rank = group_size(tp_group), group_rank(tp_group)
        base, shard_factors, lora_weights = self._shard(full, tp_group, tp_size, tp_rank)
        super().__init__(base, **full.options.kwargs(), factors=shard_factors, lora_weights=lora_weights)
        self.tp_group, self.tp_size, self.tp_rank = tp_group, tp_size, tp_rank
        self.full_in_features, self.full_out_features = full.in_features, full.out_features
        self.load_schedule_state({"step": full.step, "selected": None})
        self._mark_shards()

    @classmethod
    def _shard(cls, full: CELoRALinear, tp_group: Any, tp: int, t: int
               ) -> tuple[nn.Linear, tuple[Tensor, Tensor, Tensor] | None, tuple[Tensor, Tensor]]:
        """(this rank's base linear, its factors or None, its LoRA (A, B)) of ``full``."""
        raise NotImplementedError

    def _mark_shards(self) -> None:
        raise NotImplementedError

    def gather_lora(self, grads: bool = False) -> tuple[Tensor, Tensor]:
        """Full PEFT-shaped (A: r×n, B: m×r) LoRA weights — or their gradients.

        Collective over the TP group: every TP rank must call it.
        """
        raise NotImplementedError

    @staticmethod
    def _value(param: Tensor, grads: bool) -> Tensor:
        if not grads:
            return param.detach()
        if param.grad is None:
            raise ValueError("gather_lora(grads=True): a LoRA parameter has no gradient yet")
        return param.grad.detach()

    def extra_repr(self) -> str:
        return f"{self.parallel_mode}-parallel tp={self.tp_size} rank={self.tp_rank}, " + super().extra_repr()


class ColumnParallelCELoRALinear(_TPCELoRALinear):
    """Output rows sharded over TP; per-shard selection; see the module docstring.

    ``in_features``/``out_features``, ``k`` and ``selected`` are LOCAL (selected
    indexes this rank's rows); ``full_out_features`` is m and ``full_k`` the kept
    rows of all ranks together.
    """

    parallel_mode = "column"

    def __init__(self, source: nn.Linear | CELoRALinear, tp_group: Any, **celora_kwargs: Any) -> None:
        super().__init__(source, tp_group, **celora_kwargs)
        self.full_k = self.k * self.tp_size  # kept rows over all ranks (adaptive: set on each refresh)

    @classmethod
    def _shard(cls, full, tp_group, tp, t):
        m = full.out_features
        if m % tp:
            raise ValueError(f"{full.name or 'layer'}: out_features {m} is not divisible by TP size {tp}")
        m_l = m // tp
        rows = slice(t * m_l, (t + 1) * m_l)
        base = full.base_layer
        bias = None if base.bias is None else _own(base.bias[rows])
        shard = _frozen_linear(_own(base.weight[rows]), bias)
        factors = None
        if not full.is_exact:
            B0, A0 = _own(full.B0[rows]), _own(full.A0)
            factors = (B0, A0, residual_row_sq(shard.weight, B0, A0))
        return shard, factors, (_own(full.lora_A.weight), _own(full.lora_B.weight[rows]))

    def _mark_shards(self) -> None:
        _mark_sharded([self.base_layer.weight, self.base_layer.bias, self.lora_B.weight, self.B0], dim=0)

    @graph_boundary  # eager under torch.compile (as CELoRALinear.forward)
    def forward(self, x: Tensor) -> Tensor:
        dropout = self.training and isinstance(self.lora_dropout, nn.Dropout) and self.lora_dropout.p > 0
        if dropout:
            x = ReduceGradOverTP.apply(x, self.tp_group)
            xd = self.lora_dropout(x)
        else:
            xd = x  # fused: _combine_backward all-reduces dX
        return _CELoRAFunction.apply(
            x, xd, self.base_layer.weight, self.base_layer.bias,
            self.lora_A.weight, self.lora_B.weight, self.B0, self.A0, self,
        )

    def _combine_backward(self, fused, dX, approx, dA):
        """Fused (no LoRA dropout): ONE all-reduce of [dX | dA] (+ the approximate dX on
        refresh steps, so telemetry measures the full layer's error). With dropout the
        input gradient is summed by :class:`ReduceGradOverTP` in front of the layer
        instead, after the dropout mask has been applied."""
        measure = dX is not None and self.refresh_due()  # ‖dX‖² feeds telemetry and adaptive keep
        todo: dict[str, Tensor] = {}
        if dX is not None and fused:
            todo["dX"] = dX
        if measure and not fused:
            todo["exact"] = dX
        if approx is not None:
            todo["approx"] = approx
        if dA is not None:
            todo["dA"] = dA
        if todo:
            done = all_reduce_many(todo, self.tp_group)
            if measure:
                self.error.add(done["dX" if fused else "exact"], done.get("approx"))
            if fused and dX is not None:
                dX = done["dX"]
            # a private copy: a view would pin the whole flat buffer (T×n) to .grad
            dA = done["dA"].clone() if dA is not None else None
        return dX, dA

    def _full_k_and_m(self) -> tuple[int, int]:
        return self.full_k, self.full_out_features

    def _next_selection(self, ref_sq: float) -> Tensor | None:
        if not self.adaptive:
            return super()._next_selection(ref_sq)
        # Adaptive keep: the error budget is the full layer's, so k is chosen over the
        # scores of ALL shards (one all-gather of [scores | kept mask], m floats) and
        # each rank keeps its rows of the global top-k: ranks may keep different counts.
        # ref_sq is that of the TP-summed dX: the same on every TP rank.
        m_l, t = self.out_features, self.tp_rank
        score_sq = self._score_sq()
        kept = torch.ones(m_l, dtype=score_sq.dtype, device=score_sq.device)
        if self.selected is not None:
            kept[self.complement] = 0
        both = all_gather_cat(torch.stack([score_sq, kept]), 1, self.tp_group)
        scores, kept = both[0], both[1] > 0
        k_global, m = int(kept.sum()), scores.numel()
        if ref_sq > 0:
            dropped = ~kept if k_global < m else None
            k_global = next_adaptive_k(scores, ref_sq, self.error_budget, k_global, dropped,
                                       self.error.measured_at(self.step))
        self.full_k = m
        if k_global == m:
            return None
        chosen = topk_indices(scores, k_global)
        shard = torch.div(chosen, m_l, rounding_mode="floor")
        # a rank with no share keeps its best row: no rank runs an empty gather/GEMM
        self.full_k = int(torch.bincount(shard, minlength=self.tp_size).clamp_min(1).sum())
        selected = chosen[shard == t] - t * m_l
        if selected.numel() == 0:
            return topk_indices(score_sq, 1)
        return None if selected.numel() == m_l else selected

    def gather_lora(self, grads: bool = False) -> tuple[Tensor, Tensor]:
        A = self._value(self.lora_A.weight, grads)
        B = all_gather_cat(self._value(self.lora_B.weight, grads), 0, self.tp_group)
        return A.clone(), B

    def global_selected(self) -> Tensor | None:
        """This rank's selection in full-layer row numbering (for logs and tests)."""
        if self.selected is None:
            return None
        return self.selected + self.tp_rank * self.out_features


class RowParallelCELoRALinear(_TPCELoRALinear):
    """Input columns sharded over TP; one identical selection on every TP rank.

    ``in_features`` is LOCAL (n/tp), ``out_features``, ``k`` and ``selected`` are
    the full layer's; ``full_in_features`` is n.
    """

    parallel_mode = "row"

    @classmethod
    def _shard(cls, full, tp_group, tp, t):
        n = full.in_features
        if n % tp:
            raise ValueError(f"{full.name or 'layer'}: in_features {n} is not divisible by TP size {tp}")
        n_l = n // tp
        cols = slice(t * n_l, (t + 1) * n_l)
        base = full.base_layer
        bias = None if base.bias is None else _own(base.bias)
        shard = _frozen_linear(_own(base.weight[:, cols]), bias)
        factors = None
        if not full.is_exact:
            B0, A0 = _own(full.B0), _own(full.A0[:, cols])
            ws_row_sq = residual_row_sq(shard.weight, B0, A0)  # partial: this column shard
            ws_row_sq = all_reduce_many({"ws": ws_row_sq}, tp_group)["ws"].clone()
            factors = (B0, A0, ws_row_sq)
        return shard, factors, (_own(full.lora_A.weight[:, cols]), _own(full.lora_B.weight))

    def _mark_shards(self) -> None:
        _mark_sharded([self.base_layer.weight, self.lora_A.weight, self.A0], dim=1)

    @graph_boundary  # eager under torch.compile (as CELoRALinear.forward)
    def forward(self, x: Tensor) -> Tensor:
        xd = self.lora_dropout(x)  # the mask acts on this rank's own input columns
        return _RowFunction.apply(
            x, xd, self.base_layer.weight, self.base_layer.bias,
            self.lora_A.weight, self.lora_B.weight, self.B0, self.A0, self,
        )

    def finish_step(self) -> None:
        if self._pending_colsq is None:
            super().finish_step()
            return
        # Telemetry: the full dX's squared error is the sum over the column shards.
        sums = torch.tensor([self.error.err_sq, self.error.ref_sq], dtype=torch.float64,
                            device=self.base_layer.weight.device)
        sums = all_reduce_many({"s": sums}, self.tp_group)["s"]
        self.error.err_sq, self.error.ref_sq = float(sums[0]), float(sums[1])
        super().finish_step()
        # identical I on every TP rank, by construction: the first rank's kept mask wins
        # (a mask, not the indices: adaptive keep may choose another k, or none, elsewhere)
        kept = torch.zeros(self.out_features, dtype=torch.uint8, device=self.base_layer.weight.device)
        kept[self.selected if self.selected is not None else slice(None)] = 1
        broadcast_([kept], self.tp_group)
        self.set_selected(None if bool(kept.all()) else kept.nonzero().flatten())

    def gather_lora(self, grads: bool = False) -> tuple[Tensor, Tensor]:
        A = all_gather_cat(self._value(self.lora_A.weight, grads), 1, self.tp_group)
        B = self._value(self.lora_B.weight, grads)
        return A, B.clone()


def tp_layers(model: nn.Module):
    """(name, layer) for every tensor-parallel CE-LoRA layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, _TPCELoRALinear):
            yield name, module


__all__ = ["ColumnParallelCELoRALinear", "RowParallelCELoRALinear", "tp_layers"]
