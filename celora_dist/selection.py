"""Index selection: scores, deterministic top-k, the refresh schedule hook, DP sync.

The schedule is counted in optimizer steps. On a refresh step every backward of
the step (all gradient-accumulation micro-batches) is exact and adds its squared
G column norms to the layer's pending scores; :func:`on_optimizer_step` then picks
the new indices (after summing the scores over the data-parallel group when
``sync_indices`` is on) and they apply from the next backward on.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from .layer import CELoRALinear


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores, ties to the lower index, returned sorted ascending.

    torch.topk makes no promise about ties, so it only supplies the k-th largest value
    t; the result is every index scoring above t plus the lowest-indexed ones scoring
    exactly t. Deterministic across ranks and runs, and O(V): a stable sort of the
    49K-entry vocabulary scores took 32 ms on 2 CPU cores, topk 2.4 ms.
    """
    n = scores.numel()
    if not 0 < k <= n:
        raise ValueError(f"top-k: k={k} must be in [1, {n}]")
    if k == n:
        return torch.arange(n, device=scores.device)
    threshold = torch.topk(scores, k, sorted=False).values.min()
    above = (scores > threshold).nonzero().flatten()
    at = (scores == threshold).nonzero().flatten()[: k - above.numel()]
    return torch.sort(torch.cat([above, at])).values


def complement_of(selected: Tensor, m: int) -> Tensor:
    """Sorted indices of range(m) not in ``selected``."""
    mask = torch.ones(m, dtype=torch.bool, device=selected.device)
    mask[selected] = False
    return mask.nonzero().flatten()


def select_indices(colsq: Tensor | None, ws_row_sq: Tensor, k: int, score: str) -> Tensor:
    """Top-k output features by ``score``.

    gradient: colsq_i · ‖Ws[i, :]‖² — the squared ‖G[:, i]‖·‖Ws[i, :]‖ of DESIGN.md.
    static:   ‖Ws[i, :]‖² alone (the released code's effective behaviour).
    """
    if score == "static":
        return topk_indices(ws_row_sq, k)
    if colsq is None:
        raise ValueError("gradient score needs the column norms of G")
    return topk_indices(colsq.to(ws_row_sq.device) * ws_row_sq, k)


def celora_layers(model: nn.Module) -> Iterator[tuple[str, "CELoRALinear"]]:
    from .layer import CELoRALinear

    for name, module in model.named_modules():
        if isinstance(module, CELoRALinear):
            yield name, module


def scheduled_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """CE-LoRA layers and vocab-sparse heads: everything on_optimizer_step drives."""
    for name, module in model.named_modules():
        if getattr(module, "_celora_scheduled", False):
            yield name, module


class RelErrorMeter:
    """Sums ‖dX_exact‖² and ‖dX_approx − dX_exact‖² over one step's micro-batches.

    ``ref_sq`` is accumulated on every exact (refresh) backward, ``err_sq`` only where
    indices were in use; both are plain sums, so they add across data-parallel ranks.
    """

    def __init__(self) -> None:
        self.err_sq = self.ref_sq = 0.0
        self.measured = False
        self.last: float | None = None
        self.last_step: int | None = None

    def add(self, exact: Tensor, approx: Tensor | None = None) -> None:
        exact32 = exact.float()
        self.ref_sq += float(exact32.pow(2).sum())
        if approx is not None:
            self.err_sq += float((approx.float() - exact32).pow(2).sum())
            self.measured = True

    def measured_at(self, step: int) -> float | None:
        """The relative error published for ``step``, None if that step measured none."""
        return self.last if self.last_step == step else None

    def finish(self, step: int) -> None:
        """Publish the step's relative error (if one was measured) and reset the sums."""
        if self.measured and self.ref_sq > 0:
            self.last = (self.err_sq / self.ref_sq) ** 0.5
            self.last_step = step
        self.err_sq = self.ref_sq = 0.0
        self.measured = False


def choose_k(score_sq: Tensor, ref_sq: float, budget: float, calibration: float = 1.0) -> int:
    """Smallest k whose estimated relative dX error stays within ``budget``.

    Dropping the features outside the top-k leaves E = G[:, Ī] Ws[Ī], a sum of rank-1
    terms with ‖G[:, i]‖·‖Ws[i, :]‖ = score_i; for weakly correlated terms
    ‖E‖² ≈ Σ_Ī score_i², so est(k) = calibration · sqrt(tail_k / ‖dX_exact‖²), where
    tail_k is the mass of all but the k largest squared scores and ``calibration`` is the
    measured/estimated ratio for the indices in use (it absorbs the cross terms).
    """
    m = score_sq.numel()
    if budget <= 0 or ref_sq <= 0:
        return m
    ordered = torch.sort(score_sq.double().flatten(), descending=True).values
    # tail[k] = sum of ordered[k:], for k = 0..m (tail[m] = 0)
    tail = torch.cat([ordered.flip(0).cumsum(0).flip(0), ordered.new_zeros(1)])
    est = calibration * (tail.clamp_min(0) / ref_sq).sqrt()
    ok = (est[1:] <= budget).nonzero()
    return int(ok[0]) + 1 if ok.numel() else m


def next_adaptive_k(score_sq: Tensor, ref_sq: float, budget: float, k: int, dropped: Tensor | None,
                    measured: float | None) -> int:
    """Adaptive keep's k for the next interval, from one refresh step's exact scores.

    ``k``/``dropped``: the kept count and the dropped features (indices or a mask)
    of the selection in use, ``dropped`` None while the layer ran exact;
    ``measured``: the relative error measured for that selection on this step (None
    if not measured). The tail-mass estimate is calibrated by measured/estimated,
    and k shrinks at most halfway to a smaller candidate per refresh (grows at once).
    A pure function of its inputs, so every rank that feeds it the same (synced or
    gathered) scores picks the same k.
    """
    calibration = 1.0
    if dropped is not None and measured is not None and measured > 0:
        dropped_sq = float(score_sq[dropped].sum())
        if dropped_sq > 0:
            calibration = min(4.0, max(0.5, measured / (dropped_sq / ref_sq) ** 0.5))
    candidate = choose_k(score_sq, ref_sq, budget, calibration)
    if dropped is not None and candidate < k:
        candidate = math.ceil((k + candidate) / 2)
    return candidate


def _all_reduce_scores(layers: list["CELoRALinear"], group: Any) -> None:
    """Sum every pending score vector and error sum over ``group`` in ONE all-reduce."""
    parts = []
    for layer in layers:
        sums = torch.tensor([layer.error.err_sq, layer.error.ref_sq], dtype=torch.float32,
                            device=layer._pending_colsq.device)
        parts += [layer._pending_colsq, sums]
    flat = torch.cat(parts)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for layer in layers:
        m = layer._pending_colsq.numel()
        layer._pending_colsq = flat[offset:offset + m]
        layer.error.err_sq, layer.error.ref_sq = (float(v) for v in flat[offset + m:offset + m + 2])
        offset += m + 2


def on_optimizer_step(model: nn.Module, group: Any = None) -> None:
    """Advance every CE-LoRA layer's step counter; finish a refresh if this step was one.

    Call once per optimizer step (after ``optimizer.step()`` / ``engine.step()``),
    never per micro-batch. ``group``: the data-parallel process group used to sync
    scores (default: the world, when torch.distributed is initialised).
    """
    layers = [layer for _, layer in scheduled_modules(model)]
    pending = [layer for layer in layers if layer._pending_colsq is not None]
    sync = [layer for layer in pending if layer.sync_indices]
    if group is None and any(getattr(layer, "tp_size", 1) > 1 for layer in sync):
        # Column-parallel layers score their own shard: a world all-reduce would add
        # different shards' scores together (a silent wrong selection).
        raise ValueError("on_optimizer_step: the model has tensor-parallel CE-LoRA layers; pass the "
                         "data-parallel group (group=None sums scores across TP shards)")
    if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        _all_reduce_scores(sync, group)
    for layer in layers:
        layer._finish_step()


def telemetry(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per approximate layer (and vocab-sparse head): the relative dX error last measured.

    ``rel_error`` is ‖dX_approx − dX_exact‖ / ‖dX_exact‖ of the indices that were in
    use during that step (None before the first measurement); ``k`` and ``m`` give
    the kept and total output features, ``step`` the optimizer step measured.
    """
    out = {}
    for name, layer in scheduled_modules(model):
        if layer.is_exact:
            continue
        out[name] = {
            "rel_error": layer.error.last,
            "step": layer.error.last_step,
            "k": layer.k,
            "m": layer.out_features,
        }
    return out


def celora_state_dict(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The schedule state a checkpoint must carry: step counters and selected indices."""
    return {
        name: {
            "step": layer.step,
            "selected": None if layer.selected is None else layer.selected.detach().cpu().clone(),
        }
        for name, layer in celora_layers(model)
    }


def load_celora_state_dict(model: nn.Module, state: dict[str, dict[str, Any]]) -> None:
    """Restore :func:`celora_state_dict`; names must match the model's CE-LoRA layers."""
    layers = dict(celora_layers(model))
    missing, unexpected = sorted(set(layers) - set(state)), sorted(set(state) - set(layers))
    if missing or unexpected:
        raise ValueError(f"CE-LoRA state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, entry in state.items():
        layers[name]._load_schedule_state(entry["step"], entry["selected"])
