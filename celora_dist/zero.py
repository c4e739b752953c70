"""ZeRO-3 access to partitioned parameters, in one place.

Under ZeRO-3 a parameter outside its module's forward is an empty shard; reading
it for an SVD, an export or a merge needs DeepSpeed's ``GatheredParameters``.
Ordinary tensors pass through untouched, so callers need not know the stage.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Iterable

from torch import Tensor


def is_partitioned(params: Iterable[Tensor]) -> bool:
    """True when any of ``params`` is a ZeRO-3 partitioned parameter."""
    return any(hasattr(p, "ds_id") for p in params)


def gathered(params: list[Tensor], modifier_rank: int | None = None) -> ContextManager:
    """Gather ZeRO-3 partitioned parameters for the ``with`` block (no-op for ordinary tensors).

    modifier_rank=None: read only; an int: that rank's writes are broadcast back.
    """
    if is_partitioned(params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return nullcontext()


def gathered_for_read(params: list[Tensor]) -> ContextManager:
    """Read-only gather of the ZeRO-3 partitioned ``params`` not already gathered.

    For code that reads a module's parameters without calling the module (the chunked LM-head
    loss reads the head's weight; the head's forward never runs). Inside a model's forward
    DeepSpeed already gathers such a read itself (its parameter dict's access hook registers the
    parameter as external to the running module; seen in the trainer: the head's weight arrives
    AVAILABLE, untied and tied), so this matters for calls outside any module's forward. A
    parameter already AVAILABLE is left alone: partitioning it on exit would pull it from under
    its owner."""
    if not is_partitioned(params):
        return nullcontext()
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    pending = list({id(p): p for p in params if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE}
                   .values())
    return gathered(pending) if pending else nullcontext()
