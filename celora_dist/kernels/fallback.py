"""What a failed Triton kernel leaves behind: the process-wide set of ops that now run on torch.

Triton can fail at its first compile or launch for reasons the code cannot see in
advance: no gcc or Python headers for the launcher stub, no libcuda, a ptxas error, too
much shared memory, the autotuner's scratch buffer. A failure of an op ("grad_input",
"scores") is caught by the dispatch (``dispatch.py``), recorded here with its cause and
warned once per process; that call and every later one of the op run the torch
reference. Only exceptions raised on the host at compile/launch time are caught; an
asynchronous device fault (an illegal address) poisons the CUDA context and cannot be.

Two levels, so that ranks never diverge in what they all-reduce (docs/design.md §3):
``failed(op)`` is this process's own knowledge, used at once by every call;
``agreed(op)`` is what every rank knows, set by :func:`load_flags` after the schedule
summed the :func:`flags` of all ranks (``schedule.on_optimizer_step``), and is the only
level decisions that shape a collective (the measured backend choice) may read.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

OPS = ("grad_input", "scores")  # the fixed order of the failure-flag vector

_failed: dict[str, str] = {}  # op -> cause (this process's exception, or "another rank")
_agreed: set[str] = set()


class KernelFallbackWarning(RuntimeWarning):
    """A Triton kernel failed; the op runs the torch reference from now on."""


def failed(op: str) -> bool:
    """True once ``op``'s Triton kernel failed here or on another rank (after a sync)."""
    return op in _failed


def agreed(op: str) -> bool:
    """True once every rank knows that ``op``'s Triton kernel failed somewhere."""
    return op in _agreed


def _cause(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())  # ptxas / compiler output spans many lines
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def record_failure(op: str, exc: BaseException) -> None:
    """Mark ``op`` failed in this process; warn the first time, with the cause."""
    if op in _failed:
        return
    _failed[op] = _cause(exc)
    warnings.warn(f"CE-LoRA: the Triton {op} kernel failed ({_failed[op]}); running the torch path for "
                  f"{op} from now on (every rank follows from the next optimizer step)",
                  KernelFallbackWarning, stacklevel=3)


def flags(device: torch.device | str = "cpu") -> Tensor:
    """This process's failures as a fixed-order fp32 vector (1 = failed), summable over ranks."""
    return torch.tensor([float(op in _failed) for op in OPS], dtype=torch.float32, device=device)


def load_flags(summed: Tensor) -> None:
    """Take the sum of every rank's :func:`flags`: an op flagged anywhere is failed and agreed here."""
    for op, count in zip(OPS, summed.tolist()):
        if count <= 0:
            continue
        if op not in _failed:
            _failed[op] = "failed on another rank"
            warnings.warn(f"CE-LoRA: the Triton {op} kernel failed on another rank; running the torch path "
                          f"for {op} from now on on every rank", KernelFallbackWarning, stacklevel=2)
        _agreed.add(op)


def agree_local() -> None:
    """One process, no collective: its own failures are what every rank knows."""
    _agreed.update(_failed)
