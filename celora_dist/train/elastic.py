"""Resuming a checkpoint on a different number of data-parallel ranks (docs/design.md §7).

A run may lose or gain nodes between a checkpoint and its resume (a Slurm requeue on what
is free). What depends on the DP size, and how each piece crosses a change of it:

- ZeRO's optimizer state (stages 1-3) is partitioned by DP rank, and DeepSpeed refuses
  a partition count it did not save. Its own answer is the
  universal checkpoint: the step's folder is converted once, by global rank 0, with
  ``deepspeed.checkpoint.ds_to_universal`` into ``OUTPUT/checkpoints/universal/TAG/`` (one
  folder per parameter: fp32 weights, Adam's moments and step), and the engine, built with
  ``checkpoint.load_universal``, loads that at any DP size. Only the LoRA parameters are
  in it (frozen weights are never saved), so the conversion takes a second or two.
  ZeRO-0 (fp32 or bf16) keeps one unpartitioned optimizer state that loads at any size as is.
- The data position is kept in global samples and the global batch (micro-batch x
  grad-accum x DP ranks) must stay what it was: then step s trains on the same samples
  on any number of ranks (``data.StepBatches``). A changed global batch is refused,
  naming the flags that restore it, rather than silently changing the optimisation.
- The CE-LoRA schedule (step counters, selected indices) is the same on every DP rank
  when indices are synced (the default); without sync, DP rank r continues rank
  r mod N's indices until the next refresh.
- RNG (LoRA dropout): each rank is reseeded from (seed, step, DP rank).
- TP: a TP size change, or a DP size change under TP, is refused (the LoRA shards and
  the row layers' indices are laid out per TP rank; DeepSpeed's converter does not know
  this trainer's sharding).
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import traceback
from pathlib import Path
from typing import Any

from .errors import UsageError

UNIVERSAL = "universal"  # OUTPUT/checkpoints/universal/<tag>: the converted copies
CONVERTED = "CONVERTED"  # written last inside it: a crash mid-conversion leaves no half folder in use


def check_resize(saved: dict[str, Any], run: dict[str, Any], where: str) -> int | None:
    """The saved DP size when this run has another one (an elastic resume), else None.

    Raises UsageError for a TP size change, a DP size change under TP or SP, or a global batch
    that differs from the saved one (naming the flags that make it equal)."""
    if not saved:  # a checkpoint from before run_info.json: taken as saved by this layout
        return None
    saved_tp, tp = saved.get("tp_size", 1) or 1, run["tp_size"]
    if saved_tp != tp:
        raise UsageError(f"--resume {where}: saved with TP size {saved_tp}, this run has TP size {tp}; a checkpoint "
                         f"resumes only at its own TP size (LoRA shards and indices are laid out per TP rank): "
                         f"use --tp {saved_tp}")
    saved_dp = saved.get("dp_size", saved.get("world_size", run["dp_size"]) // saved_tp)
    if saved_dp == run["dp_size"]:
        return None
    if tp > 1:
        raise UsageError(f"--resume {where}: saved by {saved_dp} data-parallel rank(s) of TP {tp}, this run has "
                         f"{run['dp_size']}; under tensor parallelism resume on the same number of ranks "
                         f"({saved_dp * tp})")
    sp = run.get("sp_size", 1)
    if sp > 1:  # DeepSpeed's universal-checkpoint conversion under Ulysses: not verified here
        raise UsageError(f"--resume {where}: saved by {saved_dp} data-parallel rank(s) of sequence-parallel {sp}, "
                         f"this run has {run['dp_size']}; under --sequence-parallel resume on the same number of "
                         f"ranks ({saved_dp * sp})")
    if "global_batch" in saved and saved["global_batch"] != run["global_batch"]:
        raise UsageError(_batch_message(saved, run, where))
    return saved_dp


def _batch_message(saved: dict[str, Any], run: dict[str, Any], where: str) -> str:
    size, dp, mb = saved["global_batch"], run["dp_size"], run["micro_batch"]
    if size % dp:
        fix = f"run on a number of ranks that divides {size}"
    elif (size // dp) % mb == 0:
        fix = f"e.g. --grad-accum {size // dp // mb}" + ("" if mb == saved["micro_batch"] else f" --micro-batch {mb}")
    else:
        fix = f"e.g. --micro-batch {size // dp} --grad-accum 1"
    return (f"--resume {where}: saved with a global batch of {size} samples (micro-batch {saved['micro_batch']} x "
            f"grad-accum {saved['grad_accum']} x {saved['dp_size']} rank(s)), this run's is {run['global_batch']} "
            f"(micro-batch {mb} x grad-accum {run['grad_accum']} x {dp} rank(s)); the data position and the "
            f"optimizer's steps count global batches, so keep micro-batch x grad-accum x ranks = {size}: {fix}")


def configure(ds_config: dict[str, Any], tag_dir: Path) -> None:
    """Have the engine load a universal checkpoint when the saved optimizer state is
    partitioned by DP rank (``*optim_states.pt`` files: ZeRO 1-3); ZeRO-0 keeps it whole in
    the model-states file, which loads at any DP size as is."""
    if any(tag_dir.glob("*optim_states.pt")):
        ds_config.setdefault("checkpoint", {})["load_universal"] = True


def universal_folder(tag_dir: Path, root: Path) -> tuple[str, str]:
    """(load_dir, tag) of the universal copy of checkpoint ``tag_dir``, ``root/<tag>``; converted
    first unless a finished copy is there (collective).

    ``root`` is under this run's own --output-dir, so a read-only or shared checkpoint can be
    resumed too. Global rank 0 converts (``CONVERTED`` marks a finished copy; an unfinished
    one is redone), the others wait at the barrier. DeepSpeed's converter prints progress: it
    goes to ``universal.log`` in the copy instead of the run's output."""
    import torch.distributed as dist

    out = root / tag_dir.name
    if dist.get_rank() == 0 and not (out / CONVERTED).is_file():
        with contextlib.suppress(Exception):  # reported below, on every rank, after the barrier
            _convert(tag_dir, out)
    dist.barrier()
    if not (out / CONVERTED).is_file():
        raise UsageError(f"--resume: {tag_dir} could not be converted to a universal checkpoint in {out} "
                         f"(DeepSpeed's ds_to_universal failed: see {out}.log on the first rank's machine)")
    return str(root), tag_dir.name


def _convert(tag_dir: Path, out: Path) -> None:
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = Path(f"{out}.log")
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            ds_to_universal(args)
        except Exception:
            traceback.print_exc()
            raise
    (out / CONVERTED).write_bytes(b"")
    os.replace(log, out / "universal.log")


def source_rank(rank: int, saved_world: int) -> int:
    """Whose trainer state (CE-LoRA schedule) rank ``rank`` continues: its own, or rank mod N."""
    return rank % saved_world


def reseed(seed: int, step: int, dp_rank: int) -> None:
    """Fresh RNG streams for a resized run: from (seed, step, DP rank), the same on every resume."""
    import numpy as np
    import torch

    value = (seed * 1_000_003 + step * 1009 + dp_rank) % 2 ** 32
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
