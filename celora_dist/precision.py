"""Mixed precision for CE-LoRA's autograd Functions: autocast's rules, applied by hand.

A custom ``autograd.Function`` is not autocast by itself: its forward sees the ambient
autocast state only through the ops it calls (so ``F.linear`` gives bf16 while the
in-place LoRA ``addmm_`` meets an fp32 ``lora_B``), and its backward runs wherever
``loss.backward()`` is called, usually outside the autocast region. So the Functions
decide the compute dtype once in forward, with the rule autocast applies to
``F.linear`` (``torch.get_autocast_dtype`` when autocast is on for the input's
device, else the input's own dtype), run their math in it with autocast off, and
remember it for backward. The reference is PEFT's LoRA under autocast: output in the
autocast dtype; dX in the input's dtype; dA, dB in the parameters' (fp32 master)
dtype, each computed in the compute dtype and upcast (what the autograd of autocast's
weight cast does).

Unlike autocast, the Functions save the *original* parameters for backward, not cast
copies: autocast's ``F.linear`` keeps a bf16 copy of every frozen W0 alive from
forward to backward (frozen leaves are not in its cast cache either); CE-LoRA casts in
backward only what it reads (the k gathered rows of W0 on approximate steps).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``F.linear(x, W)`` would compute in here: autocast's, else x's."""
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def autocast_off(x: Tensor) -> contextlib.AbstractContextManager:
    """A region where the explicit casts alone decide the dtypes (no autocast on x's device)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype`` (itself when it already is, None stays None)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)

