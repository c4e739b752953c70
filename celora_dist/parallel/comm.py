"""Collectives for the TP layers: fused all-reduce, the Megatron "f" operator, broadcasts.

Only torch.distributed collectives on a caller-supplied group are used; process
groups come from DeepSpeed / torch.distributed (never bootstrapped here).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def group_rank(group: Any) -> int:
    """This process's rank inside ``group``."""
    return dist.get_rank(group)


def group_size(group: Any) -> int:
    return dist.get_world_size(group)


def group_src(group: Any) -> int:
    """Global rank of ``group``'s first member: the source of TP broadcasts."""
    return dist.get_global_rank(group, 0) if group is not None else 0


def all_reduce_many(tensors: dict[str, Tensor], group: Any) -> dict[str, Tensor]:
    """Sum every tensor over ``group`` with one all-reduce per dtype (usually one in all).

    Backward of a column-parallel layer needs dX and dA summed over TP (and, on
    refresh steps, the approximate dX for telemetry): concatenating them turns
    several latency-bound collectives into one. Returns new tensors, same shapes.
    """
    out: dict[str, Tensor] = {}
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, t in tensors.items():
        by_dtype.setdefault(t.dtype, []).append(name)
    for names in by_dtype.values():
        flat = torch.cat([tensors[n].reshape(-1) for n in names])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for n in names:
            numel = tensors[n].numel()
            out[n] = flat[offset:offset + numel].view(tensors[n].shape)
            offset += numel
    return out


class ReduceGradOverTP(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient backward (Megatron's "f").

    Used in front of a column-parallel layer whose LoRA branch has dropout: the
    branch's gradient then reaches the input through the dropout mask, after the
    layer's own backward, so the TP sum of partial input gradients must happen here.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


@torch.no_grad()
def broadcast_(tensors: list[Tensor], group: Any) -> None:
    """Overwrite ``tensors`` (in place) with the TP group's first rank's values."""
    src = group_src(group)
    for t in tensors:
        if t.numel():
            buf = t.detach().contiguous()
            dist.broadcast(buf, src=src, group=group)
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf)


def all_gather_cat(t: Tensor, dim: int, group: Any) -> Tensor:
    """Concatenate every rank's ``t`` along ``dim`` in group-rank order."""
    parts = [torch.empty_like(t) for _ in range(group_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
