"""The model-level CE-LoRA schedule: one call per optimizer step, telemetry, checkpoint state.

The schedule is counted in optimizer steps. On a refresh step every backward of the
step (all gradient-accumulation micro-batches) is exact and adds its squared G column
norms to the layer's pending scores; :func:`on_optimizer_step` then sums them over the
data-parallel group (``sync_indices``), and each module picks its new indices, which
apply from the next backward on. Modules are reached only through the
:class:`~celora_dist.scheduled.ScheduledModule` contract.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .kernels import fallback
from .kernels.dispatch import triton_may_run
from .scheduled import ScheduledModule


def scheduled_modules(model: nn.Module) -> Iterator[tuple[str, ScheduledModule]]:
    """CE-LoRA layers and vocab-sparse heads: everything on_optimizer_step drives."""
    for name, module in model.named_modules():
        if isinstance(module, ScheduledModule):
            yield name, module


def _all_reduce_statistics(pending: list[tuple[ScheduledModule, Tensor]], group: Any,
                           failure_flags: Tensor | None = None) -> Tensor | None:
    """Sum every module's pending statistics (and the kernel failure flags) over ``group`` in
    ONE all-reduce; returns the summed flags."""
    parts = [stats for _, stats in pending]
    if failure_flags is not None:
        device = parts[0].device if parts else failure_flags.device
        parts.append(failure_flags.to(device))
    flat = torch.cat(parts)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for module, stats in pending:
        module.load_synced_statistics(flat[offset:offset + stats.numel()])
        offset += stats.numel()
    return flat[offset:] if failure_flags is not None else None


def _device_of(modules: list[ScheduledModule]) -> torch.device:
    """The device type the model runs on (for the flags' tensor and for ``triton_may_run``)."""
    for module in modules:
        for param in module.parameters():
            return param.device
    return torch.device("cpu")


def on_optimizer_step(model: nn.Module, group: Any = None, skipped: bool = False) -> None:
    """Advance every CE-LoRA layer's step counter; finish a refresh if this step was one.

    Call once per optimizer step (after ``optimizer.step()`` / ``engine.step()``),
    never per micro-batch. ``group``: the data-parallel process group used to sync
    scores (default: the world, when torch.distributed is initialised). ``skipped``:
    the optimizer did not apply this step (an fp16 loss scaler found inf/NaN gradients):
    the step's statistics, whose scores may be inf, are dropped and the schedule does not
    advance, so the step is repeated as it was (a refresh step stays a refresh step). The
    scaler's verdict is the same on every rank (it reads the already-reduced gradients),
    so every rank drops the same step.

    Where Triton may run (``CELORA_KERNEL=triton``, or ``auto`` on CUDA), every rank's
    kernel-failure flags (``kernels/fallback.py``) are summed too, riding on the
    statistics all-reduce, so a kernel that failed on one rank is dropped on all
    (docs/design.md §3). Under a data-parallel ``group`` smaller than the world (tensor
    parallelism) the flags take one more, world, all-reduce. Every rank makes the same
    collectives: each depends only on state all ranks share.
    """
    modules = [module for _, module in scheduled_modules(model)]
    if skipped:
        for module in modules:
            module.discard_step()
        return
    pending = [(module, module.pending_statistics()) for module in modules if module.sync_indices]
    sync = [(module, stats) for module, stats in pending if stats is not None]
    if group is None and any(module.tp_size > 1 for module, _ in sync):
        # Column-parallel layers score their own shard: a world all-reduce would add
        # different shards' scores together (a silent wrong selection).
        raise ValueError("on_optimizer_step: the model has tensor-parallel CE-LoRA layers; pass the "
                         "data-parallel group (group=None sums scores across TP shards)")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _sync_over_ranks(modules, sync, group)
    else:
        fallback.agree_local()  # one process: its own kernel failures are the agreed ones
    for module in modules:
        module.finish_step()


def _sync_over_ranks(modules: list[ScheduledModule], sync: list[tuple[ScheduledModule, Tensor]],
                     group: Any) -> None:
    """The step's collectives: statistics over ``group``, kernel-failure flags over the world."""
    # layers without synced indices still sum their backend timings (a fixed-size slot on their
    # measuring step, layer.pending_statistics), so every rank runs the same dX backend
    unsynced = [(module, module.pending_statistics()) for module in modules if not module.sync_indices]
    sync = sync + [(module, stats) for module, stats in unsynced if stats is not None]
    device = _device_of(modules)
    flags = fallback.flags(device) if triton_may_run(device.type) else None
    dp_size = dist.get_world_size(group)
    ride = flags is not None and dp_size == dist.get_world_size()  # the DP group is the world
    if dp_size > 1 and (sync or ride):
        summed = _all_reduce_statistics(sync, group, flags if ride else None)
        flags = summed if ride else flags
    if flags is not None and not ride:
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    if flags is not None:
        fallback.load_flags(flags)


def telemetry(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per approximate layer (and vocab-sparse head): the relative dX error last measured.

    ``rel_error`` is ‖dX_approx − dX_exact‖ / ‖dX_exact‖ of the indices that were in
    use during that step (None before the first measurement); ``k`` and ``m`` give
    the kept and total output features of the full layer, ``step`` the optimizer step
    measured, ``kind`` "linear" or "lm_head", ``k_chosen_at`` the refresh step on which
    an adaptive layer last chose its k (None otherwise).
    """
    out = {}
    for name, module in scheduled_modules(model):
        entry = module.telemetry()
        if entry is not None:
            out[name] = entry
    return out


def celora_state_dict(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The schedule state a checkpoint must carry: step counters and selected indices."""
    return {name: module.schedule_state() for name, module in scheduled_modules(model)}


def load_celora_state_dict(model: nn.Module, state: dict[str, dict[str, Any]]) -> None:
    """Restore :func:`celora_state_dict`; names must match the model's scheduled modules."""
    modules = dict(scheduled_modules(model))
    missing, unexpected = sorted(set(modules) - set(state)), sorted(set(state) - set(modules))
    if missing or unexpected:
        raise ValueError(f"CE-LoRA state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, entry in state.items():
        modules[name].load_schedule_state(entry)
