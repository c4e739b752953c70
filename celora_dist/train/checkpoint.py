"""Checkpoints: DeepSpeed's engine state + the CE-LoRA schedule + data position + RNG.

Layout under ``OUTPUT/checkpoints``::

    step000010/            DeepSpeed's files (model states, ZeRO partitions, optimizer, scheduler)
    step000010/trainer_rank<R>.pt   per rank: CE-LoRA step counters + selected indices, RNG states
    step000010/adapter/    the PEFT adapter of that step (evaluate or ship step N as it is)
    step000010/run_info.json        the set-up (ranks, batch sizes, ZeRO stage, dtype, method)
    step000010/COMPLETE    written last, after every rank finished
    universal/step000010/  made by a resume on another number of DP ranks (elastic.py)
    latest                 the newest COMPLETE tag, replaced atomically (tmp file + rename)

A crash anywhere before ``latest`` is replaced leaves the previous tag as the one
``--resume`` loads. (DeepSpeed's own ``latest`` is written in place, so the trainer
saves with ``save_latest=False`` and commits the tag itself.)
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

from .errors import UsageError

LATEST = "latest"
COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:06d}"


def _rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"trainer_rank{rank}.pt"


def find_checkpoint(path: str) -> tuple[Path, str]:
    """(checkpoint dir, tag) for --resume: accepts the checkpoints folder or an output dir."""
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"--resume {path}: no such folder")
    for cand in (root, root / "checkpoints"):
        latest = cand / LATEST
        if latest.is_file():
            tag = latest.read_text().strip()
            if not (cand / tag / COMPLETE).is_file():
                raise UsageError(f"--resume {path}: {latest} names {tag!r}, which is not a complete checkpoint")
            return cand, tag
    raise UsageError(f"--resume {path}: no checkpoint there (no '{LATEST}' file in it or in its checkpoints/)")


RUN_INFO = "run_info.json"


# Set-up a checkpoint resumes only under (the DP size may change: elastic.check_resize).
FIXED = ("zero_stage", "dtype", "method", "quantize", "sp_size")


def check_compatible(ckpt_dir: Path, tag: str, run: dict[str, Any]) -> dict[str, Any]:
    """The set-up the checkpoint was saved with ({} for one without RUN_INFO); refuses a change
    DeepSpeed cannot load (ZeRO stage, dtype, method, sequence-parallel size)."""
    import json

    info_file = ckpt_dir / tag / RUN_INFO
    if not info_file.is_file():
        return {}
    saved = json.loads(info_file.read_text())
    diff = {k: (saved[k], run[k]) for k in FIXED if k in saved and saved[k] != run[k]}
    if diff:
        detail = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
        raise UsageError(f"--resume {ckpt_dir / tag}: saved by a different set-up ({detail}); "
                         f"resume with the same ZeRO stage, dtype, method, --quantize and --sequence-parallel size")
    return saved


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], run: dict[str, Any],
         write_adapter: Callable[[Path], Any] | None = None) -> str:
    """Save everything for ``step`` on every rank (collective), then :func:`commit` the tag.

    ``run``: the set-up a resume must match (see :func:`check_compatible`).
    ``write_adapter(folder)``: writes the step's PEFT adapter (collective), before the commit,
    so every complete checkpoint has one."""
    import torch.distributed as dist

    from .. import celora_state_dict

    tag = tag_for(step)
    # Frozen weights (W0, B0, A0: rebuilt from the base model at start) are not saved.
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)
    buf = _serialize({"celora": celora_state_dict(engine.module), "rng": _rng_state(), "step": step})
    _atomic_write(_rank_file(ckpt_dir / tag, dist.get_rank()), buf)
    if write_adapter is not None:
        write_adapter(ckpt_dir / tag / "adapter")
    commit(ckpt_dir, tag, run)
    return tag


def rotate(ckpt_dir: Path, keep: int) -> list[str]:
    """Delete the oldest complete checkpoints beyond the newest ``keep`` (rank 0 only; call after a
    commit). The tag ``latest`` names is never deleted, nor anything without COMPLETE (a save in
    progress or one a crash interrupted: ``--resume`` never reads those). Returns the deleted tags."""
    import torch.distributed as dist

    if keep <= 0 or (dist.is_initialized() and dist.get_rank() != 0):
        return []
    latest = (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).is_file() else None
    complete = sorted(d.name for d in ckpt_dir.glob("step*") if (d / COMPLETE).is_file())
    doomed = [tag for tag in complete[:-keep] if tag != latest]
    for tag in doomed:
        # un-COMPLETE first: a crash mid-delete leaves a folder resume ignores, never a half checkpoint
        (ckpt_dir / tag / COMPLETE).unlink()
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    return doomed


def commit(ckpt_dir: Path, tag: str, run: dict[str, Any]) -> None:
    """Make ``tag`` the one ``--resume`` loads, once every rank has written its files (collective).

    Rank 0 writes RUN_INFO, then COMPLETE, then replaces ``latest``, between two barriers:
    a crash before or inside this call leaves the previous tag as ``latest``. (The seam
    tests/crash_at_save.py replaces to kill a run between the files and the commit.)"""
    import json

    import torch.distributed as dist

    tag_dir = ckpt_dir / tag
    dist.barrier()
    if dist.get_rank() == 0:
        _atomic_write(tag_dir / RUN_INFO, json.dumps(run).encode())
        _atomic_write(tag_dir / COMPLETE, b"")
        _atomic_write(ckpt_dir / LATEST, tag.encode())
    dist.barrier()


def _serialize(obj) -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load(engine, ckpt_dir: Path, tag: str, saved_dp: int | None = None,
         universal_root: Path | None = None) -> dict[str, Any]:
    """Restore engine, CE-LoRA schedule and RNG; returns DeepSpeed's client_state.

    ``saved_dp``: the checkpoint's DP size when this run has another (elastic.check_resize):
    the engine then loads the step's universal copy under ``universal_root`` (converted here
    if the engine asks for one), each rank continues rank ``r mod saved_dp``'s CE-LoRA state,
    and the caller reseeds."""
    import torch
    import torch.distributed as dist

    from .. import load_celora_state_dict
    from . import elastic

    rank = dist.get_rank()
    source = rank if saved_dp is None else elastic.source_rank(rank, saved_dp)
    rank_file = _rank_file(ckpt_dir / tag, source)
    if not rank_file.is_file():
        raise UsageError(f"--resume: {ckpt_dir / tag} has no state for rank {source} "
                         f"(an incomplete copy of the checkpoint?)")
    load_dir, load_tag = str(ckpt_dir), tag
    if saved_dp is not None and engine.load_universal_checkpoint():
        load_dir, load_tag = elastic.universal_folder(ckpt_dir / tag, universal_root)
    path, client_state = engine.load_checkpoint(load_dir, tag=load_tag, load_module_strict=False)
    if path is None:
        raise UsageError(f"--resume: DeepSpeed could not load {ckpt_dir / tag}")
    mine = torch.load(rank_file, map_location="cpu", weights_only=False)
    load_celora_state_dict(engine.module, mine["celora"])
    if saved_dp is None:
        _set_rng_state(mine["rng"])
    return client_state
