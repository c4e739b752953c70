"""DeepSpeed set-up: read and check the JSON config, fill "auto" fields from the CLI,
start torch.distributed through DeepSpeed and build the engine.

The config is checked before anything is launched: unknown keys (top level and
``zero_optimization``), batch sizes that do not multiply out, and values the CLI
contradicts are reported with the file name. HF/axolotl-style optimizer and scheduler
sections become the trainer's own AdamW + schedule settings (ds_sections.py).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import socket
import sys
from typing import Any, NoReturn

from .ds_sections import resolve_optim_sections
from .errors import UsageError, load_mapping
from .parallel import resolve_tp
from .sequence import engine_mpu, resolve_sp

# Top-level sections DeepSpeed 0.16-0.19 reads. Keys starting with "_" or "comment" are comments.
KNOWN_TOP_LEVEL = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "steps_per_print", "dump_state", "optimizer", "scheduler", "fp16", "bf16", "amp", "torch_autocast",
    "gradient_clipping", "prescale_gradients", "gradient_predivide_factor", "sparse_gradients",
    "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "activation_checkpointing", "aio", "flops_profiler", "wall_clock_breakdown", "memory_breakdown",
    "tensorboard", "wandb", "csv_monitor", "comet", "monitor_config", "checkpoint", "data_efficiency",
    "data_types", "compression_training", "autotuning", "elasticity", "pipeline",
    "communication_data_type", "seq_parallel_communication_data_type", "disable_allgather",
    "dataloader_drop_last", "nebula", "tensor_parallel", "compile", "weight_quantization",
    "hybrid_engine", "curriculum_learning", "sequence_parallel_size", "use_data_before_expert_parallelism",
    "graph_harvesting", "timers", "eigenvalue", "progressive_layer_drop", "quantize_training",
    "gradient_allreduce_op", "sparse_attention", "zero_optimization_stage", "mics_shard_size",
    "mics_hierarchical_params_gather", "load_universal_checkpoint", "use_node_local_storage",
    "expert_data_topo_config", "domino", "comms_logger",
}
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
DEFAULT_MICRO_BATCH = 4
DEFAULT_GRAD_ACCUM = 1


def _zero_keys() -> set[str]:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields
    return set(fields) | {f.alias for f in fields.values() if f.alias}


def _is_comment(key: str) -> bool:
    return key.startswith("_") or key.startswith("comment")


def _num(value: Any) -> int | None:
    """An integer batch field, None for "auto"/absent."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError
    return value


def resolve_ds_config(path: str, args, world_size: int) -> dict[str, Any]:
    """Load ``path``, check it and fill it from the CLI. Sets args.micro_batch/grad_accum/tp.

    Batch sizes count data-parallel ranks: with tensor parallelism (TP size from
    ``tensor_parallel.autotp_size`` or --tp) that is ``world_size // tp``."""
    cfg = load_mapping(path, "--deepspeed_config")
    where = f"--deepspeed_config {path}"
    unknown = sorted(k for k in cfg if k not in KNOWN_TOP_LEVEL and not _is_comment(k))
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {unknown}; DeepSpeed would ignore them silently")
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UsageError(f"{where}: zero_optimization must be an object")
    unknown = sorted(k for k in zero if k not in _zero_keys() and not _is_comment(k))
    if unknown:
        raise UsageError(f"{where}: unknown zero_optimization key(s) {unknown}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UsageError(f"{where}: zero_optimization.stage must be 0-3, got {stage!r}")
    tp = resolve_tp(cfg, args, world_size, where)  # sets args.tp; TP + ZeRO-3 refused here
    sp = resolve_sp(cfg, args, world_size, where)  # sets args.sequence_parallel; SP + TP refused here
    dp_size = world_size // (tp * sp)  # DeepSpeed's batch arithmetic counts data-parallel ranks
    ranks = ("rank(s)" if tp == 1 and sp == 1 else
             f"data-parallel rank(s) ({f'TP {tp}' if tp > 1 else f'sequence-parallel {sp}'})")

    try:
        tbs, mb, ga = (_num(cfg.get(k)) for k in BATCH_KEYS)
    except TypeError:
        raise UsageError(f"{where}: {BATCH_KEYS} must be positive integers or \"auto\"") from None
    for flag, cli, value, key in (("--micro-batch", args.micro_batch, mb, BATCH_KEYS[1]),
                                  ("--grad-accum", args.grad_accum, ga, BATCH_KEYS[2])):
        if cli is not None and value is not None and cli != value:
            raise UsageError(f"batch-size mismatch: {flag} {cli} but {where} sets {key} = {value}; "
                             f"set it to \"auto\" or drop one of them")
    mb = args.micro_batch or mb
    ga = args.grad_accum or ga
    if tbs is not None:  # derive the missing one, as DeepSpeed does
        if mb is None and ga is None:
            ga = DEFAULT_GRAD_ACCUM
        if mb is None:
            mb = tbs // (ga * dp_size)
        elif ga is None:
            ga = tbs // (mb * dp_size)
        if mb < 1 or ga < 1 or mb * ga * dp_size != tbs:
            raise UsageError(
                f"batch-size mismatch: {where} sets train_batch_size = {tbs}, but micro-batch {mb} x "
                f"grad-accum {ga} x {dp_size} {ranks} = {max(mb, 0) * max(ga, 0) * dp_size}")
    mb = mb or DEFAULT_MICRO_BATCH
    ga = ga or DEFAULT_GRAD_ACCUM
    args.micro_batch, args.grad_accum = mb, ga

    out = copy.deepcopy(cfg)
    out["train_micro_batch_size_per_gpu"] = mb
    out["gradient_accumulation_steps"] = ga
    out["train_batch_size"] = mb * ga * dp_size
    if tp > 1:
        # DeepSpeed 0.19 checks train_batch_size against EVERY rank when AutoTP is on (its
        # config has no mpu yet): leave it out and let DeepSpeed derive its own (logs only;
        # gradients are averaged over the DP group, the data is split over the DP group).
        del out["train_batch_size"]
    filled, built = resolve_optim_sections(out, args, where)  # also gradient_clipping
    bf16 = out.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        args.dtype = args.dtype or "fp32"
        bf16["enabled"] = args.dtype == "bf16"
    elif args.dtype is None:
        args.dtype = "bf16" if bf16["enabled"] else "fp32"
    elif bool(bf16["enabled"]) != (args.dtype == "bf16"):
        raise UsageError(f"{where}: bf16.enabled = {bf16['enabled']} contradicts --dtype {args.dtype}")
    fp16 = out.get("fp16", {})
    if fp16.get("enabled") == "auto":  # follows --dtype, which has no fp16
        fp16["enabled"] = False
        filled.append(f"fp16.enabled=false (--dtype {args.dtype})")
    if fp16.get("enabled") is True:
        raise UsageError(f"{where}: fp16 is not supported; use --dtype bf16")
    # HF sizes reduce_bucket_size / stage3_prefetch_bucket_size / stage3_param_persistence_threshold
    # from the model's hidden size; the trainer has no model yet. DeepSpeed's own config models
    # drop an "auto" value (its default then): done here so that the note can say so.
    filled += [f"zero_optimization.{key}=DeepSpeed's default" for key in _drop_auto(out.get("zero_optimization", {}))]
    if (filled or built) and int(os.environ.get("RANK", "0")) == 0:
        parts = ([f"\"auto\" filled: {', '.join(filled)}"] if filled else []) + ([built] if built else [])
        print(f"note: {where}: " + "; ".join(parts), flush=True)
    out["zero_allow_untested_optimizer"] = True  # our AdamW is a plain torch optimizer
    out.setdefault("steps_per_print", 10 ** 9)  # the trainer prints its own progress
    out.setdefault("wall_clock_breakdown", False)
    return out


def _drop_auto(section: dict[str, Any], prefix: str = "") -> list[str]:
    """Remove every "auto" value of ``section`` (nested too); their dotted keys."""
    dropped = []
    for key, value in list(section.items()):
        if value == "auto":
            del section[key]
            dropped.append(prefix + key)
        elif isinstance(value, dict):
            dropped += _drop_auto(value, f"{prefix}{key}.")
    return dropped


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it): a world's MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_environment() -> None:
    """Single-process runs: fill the env:// variables so DeepSpeed can start a world of one.
    No GPU: select DeepSpeed's CPU accelerator (gloo) and give each local rank its share of
    the cores unless OMP_NUM_THREADS says otherwise."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    if os.environ.get("DS_ACCELERATOR") == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Several ranks on one CPU: split the cores instead of every rank spinning on all of them.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_SIZE", "1"))))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(timeout_s: float) -> None:
    """Start torch.distributed through DeepSpeed; a collective waiting longer than ``timeout_s``
    (--dist-timeout) fails instead of hanging for torch's default 30 minutes."""
    from datetime import timedelta

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    backend = get_accelerator().communication_backend_name()
    if get_accelerator().device_name() == "cpu":
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        release_shm_workspace()


def shutdown() -> None:
    """Destroy the process group, if one was started: every rank then exits with no gloo/NCCL
    worker threads left to abort the interpreter's exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(status: int) -> NoReturn:
    """End a finished rank without the interpreter's teardown: run the atexit handlers (log
    and monitor flushes, wandb.finish), flush, then ``os._exit``.

    Why: after ``shutdown()`` a 2-rank ZeRO-3 CPU run still aborted at exit with "terminate
    called without an active exception" (status -6) in 1 of 16 runs of the clean-exit
    stress test (2026-12-02) — a C++ thread of an extension destroyed while joinable during
    teardown, after every output of the run was complete. Nothing the run writes is open
    at this point, so skipping the teardown loses nothing and the exit status is the run's.
    """
    import atexit
    import logging

    try:
        atexit._run_exitfuncs()
        logging.shutdown()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def release_shm_workspace() -> None:
    """Unlink this rank's DeepSpeed CPU shared-memory all-reduce segment once every rank mapped it.

    DeepSpeed's CPU backend (one node, LOCAL_SIZE == world size) creates a 66 MB
    /dev/shm segment per rank and never unlinks it: each 2-rank CPU run leaked 132 MB
    of RAM-backed tmpfs until reboot (200 files, 13 GB, after a day of tests here).
    The mappings stay valid after unlinking; peers open each other's segment inside
    init_distributed, so after a barrier nobody needs the name any more.
    """
    import torch.distributed as dist

    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    if dist.get_world_size() > 1:
        dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the base lr at optimizer step ``step``.

    A plain closure on purpose: LambdaLR checkpoints the attributes of callable objects,
    which would pin a resumed run to the old --max-steps.
    """
    total = max(total, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def sync_lr_after_resume(scheduler) -> None:
    """Set the optimizer's lr for the restored step from this run's schedule (--max-steps may have changed).

    Only the optimizer's param groups change (the trainer reads the lr there, ``engine.get_lr()``);
    the scheduler's next ``step()`` recomputes the lr from ``last_epoch`` and this run's lambda."""
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)


def build_optimizer(params, args, total_steps: int):
    """(torch AdamW, LambdaLR) from the settled args: lr, weight_decay, adam_betas, adam_eps,
    lr_schedule, warmup (the flags and the config's optimizer/scheduler sections, ds_sections.py).
    A plain torch optimizer on purpose: DeepSpeed's fused Adam is a JIT-compiled op (not on CPU)."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=args.adam_betas,
                                  eps=args.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_schedule, args.warmup, total_steps))
    return optimizer, scheduler


def build_engine(model, ds_config: dict, args, total_steps: int):
    """deepspeed.initialize with a torch AdamW over the trainable (LoRA) parameters."""
    import deepspeed

    from ..layer import register_zero3_params

    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        register_zero3_params(model)
    optimizer, scheduler = build_optimizer([p for p in model.parameters() if p.requires_grad], args, total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=engine_mpu(ds_config))
    if args.compile:
        # engine.compile() compiles engine.module in place (nn.Module.compile): the module stays the
        # model, so its state_dict keys, checkpoints, adapter export and the CE-LoRA schedule's walk
        # over its modules are those of an eager run. torch.compile(model) before initialize would
        # hand DeepSpeed an OptimizedModule whose keys carry "_orig_mod.": checkpoints of compiled and
        # eager runs would not resume into each other.
        engine.compile(backend=args.compile)
    return engine, optimizer, scheduler
