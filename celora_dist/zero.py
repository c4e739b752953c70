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
