"""The contract between a module whose backward follows the CE-LoRA schedule and the
model-level driver (``celora_dist/schedule.py``: ``on_optimizer_step``, ``telemetry``,
``celora_state_dict``).

Implemented by :class:`~celora_dist.layer.CELoRALinear`, both tensor-parallel layers
and the vocab-sparse LM head. The driver talks to modules only through these
methods, so a new kind of scheduled module declares what it does here instead of
imitating private attributes (in the spirit of PEFT's ``LoraVariant``).

Per optimizer step the driver calls, in this order:

1. ``pending_statistics()`` on every module with ``sync_indices``: the step's
   data-parallel-summable statistics (refresh-step scores and error sums) as one
   1-D fp32 tensor, or None when nothing is pending; in a distributed run also on
   the modules without ``sync_indices``, whose vector then holds only what all
   ranks must still agree on (a layer's backend timings) and must have the same
   size on every rank whenever it is not None;
2. ``load_synced_statistics(t)`` with the sum of those tensors over the DP group;
3. ``finish_step()`` on every module: choose the next indices if this was a refresh
   step, publish the measured error, advance the step counter.

A step the optimizer skipped (fp16 loss scaling found inf/NaN) calls ``discard_step()``
on every module instead of 1–3.

Under ``torch.compile`` a scheduled module's ``forward`` is the edge of the compiled
graph (:func:`graph_boundary`, docs/design.md §4 "torch.compile"): it and its autograd
Function's backward run eager, so the state above is read and written by Python on
every step and never traced, guarded on or frozen into a graph.
"""
from __future__ import annotations

import abc
import warnings
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

# Backward passes of one refresh step after which the schedule counts as not driven. A
# refresh step's backwards are all exact, so an undriven model trains as plain LoRA
# forever: nothing else would show it. No real gradient accumulation reaches 64
# micro-batches per optimizer step on the setups this targets; one that does only sees
# this warning once.
UNDRIVEN_BACKWARDS = 64


F = TypeVar("F", bound=Callable[..., Any])

GRAPH_BOUNDARY_REASON = ("CE-LoRA: the schedule state (step counter, kept indices, dX backend measurement) "
                         "is read and written in this module's backward; it runs eager (docs/design.md §4)")


def graph_boundary(forward: F) -> F:
    """Mark a scheduled module's ``forward`` as the edge of any ``torch.compile`` graph.

    Dynamo breaks the graph at the call and runs the forward (dropout included) and its
    autograd Function eager; the rest of the model is compiled around it. Inside, the
    backward branches on ``step``, ``selected`` and the backend choice, which change from
    step to step: traced, they would be guarded on (a recompile per step) or baked in (a
    frozen selection). Measured on the tiny Llama (tests/test_compile.py): the frames
    compiled stay constant from the first step on, over refresh and approximate steps.
    """
    return torch.compiler.disable(forward, reason=GRAPH_BOUNDARY_REASON)


class UndrivenScheduleWarning(RuntimeWarning):
    """A CE-LoRA model runs backward passes but nobody calls ``on_optimizer_step``."""


_warned_undriven = False


def warn_undriven(module_name: str, backwards: int) -> None:
    """Warn once per process that the schedule of ``module_name`` is not being advanced."""
    global _warned_undriven
    if _warned_undriven:
        return
    _warned_undriven = True
    warnings.warn(
        f"CE-LoRA: {module_name or 'a layer'} ran {backwards} backward passes in one optimizer step: "
        "nothing advances the CE-LoRA schedule, so every backward stays exact (plain LoRA, no speed-up) "
        "and the kept indices are never chosen. Call celora_dist.on_optimizer_step(model) after each "
        "optimizer.step(); with a Hugging Face / TRL Trainer, use `model, callback = "
        "celora_dist.for_trainer(model, cfg)` and pass callbacks=[callback].",
        UndrivenScheduleWarning, stacklevel=2)


class ScheduledModule(abc.ABC):
    """Mixin for ``nn.Module`` classes driven by ``celora_dist.on_optimizer_step``."""

    sync_indices: bool = False  # statistics are summed over the data-parallel group
    tp_size: int = 1  # > 1: statistics cover this rank's TP shard; the DP group must be explicit

    @abc.abstractmethod
    def pending_statistics(self) -> Tensor | None:
        """This step's DP-summable statistics as one 1-D fp32 tensor, None when none are pending."""

    @abc.abstractmethod
    def load_synced_statistics(self, stats: Tensor) -> None:
        """Replace the pending statistics by ``stats`` (their sum over the DP group)."""

    @abc.abstractmethod
    def finish_step(self) -> None:
        """End of one optimizer step: finish a refresh if this was one, advance the counter."""

    @abc.abstractmethod
    def discard_step(self) -> None:
        """The optimizer skipped this step (inf/NaN under a loss scaler): drop what the step's
        backwards accumulated and do NOT advance the counter."""

    @abc.abstractmethod
    def telemetry(self) -> dict[str, Any] | None:
        """The last measured relative dX error with its step and the full layer's k and m
        (keys ``rel_error``, ``step``, ``k``, ``m``, ``kind``, ``k_chosen_at``); None when the
        module never approximates."""

    @abc.abstractmethod
    def schedule_state(self) -> dict[str, Any]:
        """What a checkpoint must carry to continue exactly: ``step`` and ``selected`` (CPU or None)."""

    @abc.abstractmethod
    def load_schedule_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`schedule_state`; pending statistics and error sums start empty."""
