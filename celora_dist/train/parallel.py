"""Tensor parallelism in the trainer (docs/design.md §2, docs/parallel.md).

The TP size is ``tensor_parallel.autotp_size`` of the DeepSpeed config (``--tp N``
fills it). Ranks form a TP x DP grid of DeepSpeed's own groups
(``celora_dist.parallel.init_tp_groups``): the layers shard over the TP group, the
data is split and CE-LoRA scores are synced over the DP group, and the engine
(told the model is already sharded) reduces gradients over the DP group only.

    tp = resolve_tp(ds_config, args, world, where)   # before any work: checks, ZeRO-3 refused
    check_tp_model(model_dir, tp)                    # heads / features divide by tp
    ...init_distributed()
    tp_group, dp_group = process_groups(tp)          # (None, the world) without TP
    ...inject_celora(model, cfg); shard_model(model, tp_group)
    ...training...; export_adapter(model, out, base, tp)   # gathered to full PEFT tensors
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UsageError

# Keys of DeepSpeed's "tensor_parallel" section that mean something here. The others
# configure AutoTP's own sharding, which the trainer replaces with its CE-LoRA layers.
TP_KEYS = ("autotp_size",)


def resolve_tp(cfg: dict[str, Any], args, world_size: int, where: str) -> int:
    """The TP size from ``cfg["tensor_parallel"]["autotp_size"]`` and ``--tp``; checked.

    Fills ``cfg["tensor_parallel"]`` in place and sets ``args.tp``. Raises UsageError
    naming the config for TP + ZeRO-3, a size that does not divide the ranks, a
    ``--tp`` that contradicts the file, or AutoTP keys the trainer would ignore.
    """
    section = cfg.get("tensor_parallel", {})
    if not isinstance(section, dict):
        raise UsageError(f"{where}: tensor_parallel must be an object like {{\"autotp_size\": 2}}")
    ignored = sorted(k for k in section if k not in TP_KEYS and not (k.startswith("_") or k.startswith("comment")))
    if ignored:
        raise UsageError(f"{where}: tensor_parallel key(s) {ignored} are not used: the trainer shards the "
                         f"CE-LoRA layers itself and reads only {list(TP_KEYS)}")
    size = section.get("autotp_size", "auto")
    if size == "auto" or size is None:
        size = None
    elif isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise UsageError(f"{where}: tensor_parallel.autotp_size must be a positive integer or \"auto\", "
                         f"got {size!r}")
    size = size or None  # DeepSpeed reads 0 as "off"
    cli = getattr(args, "tp", None)
    if cli is not None and size is not None and cli != size:
        raise UsageError(f"TP size mismatch: --tp {cli} but {where} sets tensor_parallel.autotp_size = {size}; "
                         f"set it to \"auto\" or drop one of them")
    tp = cli or size or 1
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    from ..parallel import check_tp_zero_stage

    try:
        check_tp_zero_stage(tp, stage)
    except ValueError as e:
        raise UsageError(f"{where}: {e} (e.g. ds_configs/tp2_zero1.json)") from None
    if world_size % tp:
        raise UsageError(f"tensor-parallel size {tp} ({where}) does not divide the {world_size} rank(s): "
                         f"launch a multiple of {tp} ranks")
    if tp > 1:
        cfg["tensor_parallel"] = {**section, "autotp_size": tp}
    args.tp = tp
    return tp


def check_tp_model(model_dir, tp: int) -> None:
    """Fail before loading weights if the model cannot be split ``tp`` ways (Llama-style configs)."""
    if tp == 1:
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    sizes = {"num_attention_heads": getattr(config, "num_attention_heads", None),
             "num_key_value_heads": getattr(config, "num_key_value_heads", None),
             "intermediate_size": getattr(config, "intermediate_size", None)}
    bad = {k: v for k, v in sizes.items() if isinstance(v, int) and v % tp}
    if bad:
        raise UsageError(f"--model {model_dir}: cannot split {bad} over tensor-parallel size {tp}; "
                         f"choose a TP size that divides them")


def process_groups(tp: int) -> tuple[Any, Any]:
    """(tp_group, dp_group): DeepSpeed's TP x DP grid; (None, the world) without TP.

    The one place the trainer looks up its data-parallel group (the data split, the loss
    all-reduce, the CE-LoRA score sync and the evaluation all use it). With TP the ranks
    of a TP group are consecutive (DeepSpeed's mesh): global rank g has TP rank g % tp
    and DP rank g // tp; both groups come from DeepSpeed's public getters. Without TP the
    DP group is every rank: DeepSpeed's public ``get_data_parallel_group()`` only knows a
    DP group once model-parallel groups exist (it asserts otherwise), and the engine's own
    DP group is then a clone of the world, so the world group has the same ranks in the
    same order.
    """
    if tp == 1:
        import torch.distributed as dist

        return None, dist.group.WORLD
    from ..parallel import init_tp_groups

    return init_tp_groups(tp)


def shard_model(model, tp_group) -> None:
    """Make the injected CE-LoRA layers tensor parallel and keep DeepSpeed's AutoTP off them."""
    if tp_group is None:
        return
    from ..parallel import mark_tensor_parallel, parallelize_celora

    mark_tensor_parallel(parallelize_celora(model, tp_group))


def export_adapter(model, directory: Path, base_model: str, tp: int) -> Path:
    """PEFT adapter with full tensors (TP shards gathered). Collective: every rank calls it."""
    if tp == 1:
        from ..adapters import save_adapter

        return save_adapter(model, directory, base_model=base_model)
    from ..parallel import save_tp_adapter

    return save_tp_adapter(model, directory, base_model=base_model)
