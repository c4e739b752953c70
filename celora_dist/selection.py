"""Index selection: scores, deterministic top-k, the refresh schedule hook, DP sync.

The schedule is counted in optimizer steps. On a refresh step every backward of
the step (all gradient-accumulation micro-batches) is exact and adds its squared
G column norms to the layer's pending scores; :func:`on_optimizer_step` then picks
the new indices (after summing the scores over the data-parallel group when
``sync_indices`` is on) and they apply from the next backward on.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from .layer import CELoRALinear


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores, ties to the lower index, returned sorted ascending.

    A stable descending sort keeps equal scores in index order, so the selection is
    deterministic across ranks and runs (torch.topk makes no such promise).
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:k]).values


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


def _all_reduce_scores(layers: list["CELoRALinear"], group: Any) -> None:
    """Sum every pending score vector over ``group`` in ONE all-reduce (not one per layer)."""
    flat = torch.cat([layer._pending_colsq for layer in layers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for layer in layers:
        m = layer._pending_colsq.numel()
        layer._pending_colsq = flat[offset:offset + m]
        offset += m


def on_optimizer_step(model: nn.Module, group: Any = None) -> None:
    """Advance every CE-LoRA layer's step counter; finish a refresh if this step was one.

    Call once per optimizer step (after ``optimizer.step()`` / ``engine.step()``),
    never per micro-batch. ``group``: the data-parallel process group used to sync
    scores (default: the world, when torch.distributed is initialised).
    """
    layers = [layer for _, layer in celora_layers(model)]
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
    """Per approximate layer: the relative dX error measured on the last refresh step.

    ``rel_error`` is ‖dX_approx − dX_exact‖ / ‖dX_exact‖ of the indices that were in
    use during that step (None before the first measurement); ``k`` and ``m`` give
    the kept and total output features, ``step`` the optimizer step measured.
    """
    out = {}
    for name, layer in celora_layers(model):
        if layer.is_exact:
            continue
        out[name] = {
            "rel_error": layer.last_rel_error,
            "step": layer.last_error_step,
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
