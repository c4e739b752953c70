"""Everything a run needs settled before any real work: one :class:`Job`.

:func:`prepare` reads the DeepSpeed config (batch sizes, TP size, dtype), checks a
resume against the checkpoint's set-up, reads the train and held-out records and
checks the model's target modules and TP split, all before torch.distributed or
the weights are touched: a bad flag or file is a :class:`UsageError` within seconds.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoint, data, elastic, embedded, engine, model, monitor, parallel, quantize, sequence


@dataclass
class Job:
    """What this run trains, on what, and how it is laid out over the ranks."""

    world: int  # ranks
    tp: int  # tensor-parallel size (1: data parallel only)
    sp: int  # sequence-parallel size (Ulysses; 1: off)
    zero_stage: int
    is_main: bool  # global rank 0: writes metrics, summary, progress
    ds_config: dict[str, Any]  # resolved: batch sizes, dtype, clipping, TP filled in
    run_info: dict[str, Any]  # the set-up a resume must match (saved with each checkpoint)
    model_dir: str | Path
    train_records: list[dict]
    eval_records: list[dict]
    task: str  # one line for the banner
    resized_from: int | None = None  # a resume on another DP size: the checkpoint's (elastic.py)


def run_info(args: argparse.Namespace, world: int, zero_stage: int) -> dict[str, Any]:
    """The set-up a resume is checked against (checkpoint.check_compatible, elastic.check_resize)."""
    dp = world // (args.tp * args.sequence_parallel)
    return {"world_size": world, "zero_stage": zero_stage, "dtype": args.dtype, "method": args.method,
            "tp_size": args.tp, "sp_size": args.sequence_parallel, "dp_size": dp, "quantize": args.quantize,
            "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
            "global_batch": args.micro_batch * args.grad_accum * dp}


def prepare(args: argparse.Namespace) -> Job:
    """Check and settle the run (fills args.micro_batch/grad_accum/tp/dtype; the embedded job's
    step and evaluation counts). Raises UsageError; starts no process group, loads no weights."""
    engine.setup_environment()
    world = int(os.environ["WORLD_SIZE"])
    ds_config = engine.resolve_ds_config(args.deepspeed_config, args, world)  # also the TP size: args.tp
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    monitor.add_reporters(ds_config, monitor.parse_report_to(args.report_to), Path(args.output_dir))
    is_main = int(os.environ.get("RANK", "0")) == 0
    info = run_info(args, world, zero_stage)
    resized_from = None
    if args.resume:
        saved = checkpoint.check_compatible(args.resume_dir, args.resume_tag, info)
        resized_from = elastic.check_resize(saved, info, str(args.resume_dir / args.resume_tag))
        if resized_from is not None:  # ZeRO's partitions cross DP sizes as a universal checkpoint
            elastic.configure(ds_config, args.resume_dir / args.resume_tag)
    if args.embedded:
        model_dir = embedded.ensure_model(verbose=is_main)
        train_records, eval_records, task = embedded.task_records(args.mc_format)
        embedded.fill_defaults(args)
    else:
        model_dir = args.model
        train_records, eval_records, task = data.file_task(args.data, args.eval_data, args.eval_fraction,
                                                           args.mc_format)
    if args.eval_samples is not None:
        eval_records = eval_records[: args.eval_samples]
    if any("messages" in r for r in train_records + eval_records):  # template problems before any work
        model.check_chat(model_dir, args.chat_template, next(r for r in train_records + eval_records
                                                              if "messages" in r))
    model.check_targets(model_dir, args.celora)
    parallel.check_tp_model(model_dir, args.tp)
    quantize.check(args, model_dir, zero_stage, args.tp)
    sequence.check_sp_model(model_dir, args.sequence_parallel)
    return Job(world=world, tp=args.tp, sp=args.sequence_parallel, zero_stage=zero_stage, is_main=is_main, ds_config=ds_config,
               run_info=info, model_dir=model_dir, train_records=train_records, eval_records=eval_records,
               task=task, resized_from=resized_from)
