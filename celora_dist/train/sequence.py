"""Ulysses sequence parallelism in the trainer (--sequence-parallel N; docs/design.md §2).

DeepSpeed's own implementation (``deepspeed.runtime.sequence_parallel.ulysses_sp``, 0.19.8):
every N consecutive ranks form an SP group that trains ONE sequence, each rank holding
1/N of its tokens; the attention all-to-all (heads <-> sequence) is DeepSpeed's wrapper
around HF's sdpa. The layout, with DP = world / N (TP is refused with SP):

    sp = resolve_sp(ds_config, args, world, where)   # before any work: the checks below
    ...init_distributed()
    dp_group, sp_group = start(args, job, dp_group)  # register Ulysses, the DP group without SP peers
    ...load(..., attn_implementation(sp)); micro_loss(engine, micro, sp_group)
    on_optimizer_step(model, group=score_group(dp_group, sp_group))     # SP x DP

Why each group:
- data: split over the pure DP group (ranks with the same SP rank), so the N ranks of an
  SP group see the same micro-batches and each takes its shard of them;
- CE-LoRA scores (and the adaptive-k statistics and error telemetry on the same all-reduce):
  summed over SP x DP, DeepSpeed's sequence-data-parallel group. Each rank's activations
  are one shard of a sequence: the sum over the SP peers is the full sequence's score, so
  every rank of a sequence (and the 1-process run) picks the same indices. A pure DP group
  would let the shards of one sequence pick different indices for the same weights.
- loss: this rank's token-loss SUM over its shard divided by the SP group's valid-token
  count (a plain all-reduce, no gradient through it): the gradients of the SP ranks then
  add up to the full sequence's. ZeRO 0/1/2 sum the gradients over the SP ranks
  (dividing by DP only): exact as is. ZeRO-3's reduce-scatter (its default) averages over
  the whole world, i.e. also divides by N: the backward loss is scaled by N there, what the
  tutorial's differentiable all-gather does without the collective. Measured 2026-12-03
  against one process (fp32, tiny Llama, 20 steps): ZeRO 0/1/2/3 (and ZeRO-3 with
  reduce_scatter false: factor 1) and SP 2 x DP 2 on 4 ranks, losses 7e-7, adapter 2.2e-6,
  gradient norm 1.2e-6 relative, the same indices on every rank (tests/test_train_sp.py;
  RECIPES.md "Ulysses sequence parallelism on CPU"); grad-accum 2 with gradient checkpointing:
  adapter 3.6e-6 after 8 steps. bf16: the first gradient norm within 4e-4.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .errors import UsageError

# the core attention under Ulysses; the model is loaded with it (eager is refused by DeepSpeed:
# it needs a 4D mask, which the shards cannot carry)
CORE_ATTENTION = "sdpa"


def resolve_sp(cfg: dict[str, Any], args: argparse.Namespace, world_size: int, where: str) -> int:
    """The SP size from ``cfg["sequence_parallel_size"]`` and ``--sequence-parallel``; checked.

    Sets ``args.sequence_parallel`` and fills the config key. Raises UsageError for a size that
    does not divide the ranks, SP with TP, --packing, a --seq-len the size does not divide, and
    flags not verified under SP (--quantize)."""
    size = cfg.get("sequence_parallel_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise UsageError(f"{where}: sequence_parallel_size must be a positive integer, got {size!r}")
    cli = getattr(args, "sequence_parallel", None)
    if cli is not None and size is not None and cli != size:
        raise UsageError(f"sequence-parallel size mismatch: --sequence-parallel {cli} but {where} sets "
                         f"sequence_parallel_size = {size}; drop one of them")
    sp = cli or size or 1
    args.sequence_parallel = sp
    if sp == 1:
        cfg.pop("sequence_parallel_size", None)
        return 1
    if world_size % sp:
        raise UsageError(f"--sequence-parallel {sp} does not divide the {world_size} rank(s): launch a multiple "
                         f"of {sp} ranks (data-parallel x sequence-parallel = ranks)")
    if args.tp > 1:
        raise UsageError(f"--sequence-parallel {sp} with tensor parallelism (TP {args.tp}, {where}) is not "
                         f"supported: use one of them")
    if args.packing:
        raise UsageError(f"--sequence-parallel {sp} with --packing: Ulysses over sdpa masks attention causally over "
                         f"the whole sequence, so packed examples would attend to each other; drop --packing")
    if args.seq_len % sp:
        raise UsageError(f"--seq-len {args.seq_len} is not divisible by --sequence-parallel {sp}: each rank holds "
                         f"seq-len / {sp} tokens of a sequence")
    if args.quantize:
        raise UsageError(f"--quantize with --sequence-parallel {sp} is not supported (not verified)")
    cfg["sequence_parallel_size"] = sp
    return sp


def check_sp_model(model_dir: str | Path, sp: int) -> None:
    """Fail before loading weights if the model cannot run Ulysses ``sp`` ways over sdpa."""
    if sp == 1:
        return
    config = json.loads((Path(model_dir) / "config.json").read_text())
    attn = config.get("attn_implementation") or config.get("_attn_implementation")
    if attn is not None and attn != CORE_ATTENTION and "flash" not in str(attn):
        raise UsageError(f"--model {model_dir}: its config asks for attn_implementation {attn!r}; Ulysses sequence "
                         f"parallelism needs sdpa or flash attention, and under --sequence-parallel the trainer "
                         f"loads the model with attn_implementation=\"{CORE_ATTENTION}\": remove the entry from "
                         f"config.json if sdpa is right for this model")
    heads = config.get("num_attention_heads")
    if isinstance(heads, int) and heads % sp:
        raise UsageError(f"--model {model_dir}: its {heads} attention heads do not split over --sequence-parallel "
                         f"{sp} (Ulysses gives each rank heads / {sp} heads of the whole sequence)")


def attn_implementation(sp: int) -> str | None:
    """The attention the model is loaded with: sdpa under SP (what Ulysses wraps), else the model's default."""
    return CORE_ATTENTION if sp > 1 else None


def start(args: argparse.Namespace, job, dp_group: Any) -> tuple[Any, Any]:
    """(data-parallel group, SP group): ``(dp_group, None)`` without SP.

    Under SP: DeepSpeed's groups (consecutive ranks form an SP group) and its Ulysses
    attention registered for sdpa (process-global: every sdpa model of this process), with
    SP bypassed in eval mode (the evaluation runs whole sequences on each rank); the data
    group is made here: the ranks with the same SP rank."""
    sp = job.sp
    if sp == 1:
        return dp_group, None
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=str(job.model_dir), core_attn_implementation=CORE_ATTENTION, sequence_parallel_size=sp,
        micro_batch_size=args.micro_batch, seq_length=args.seq_len, seq_length_is_variable=True,
        disable_in_eval=True)
    world = dist.get_world_size()
    data_group, _ = dist.new_subgroups_by_enumeration([list(range(r, world, sp)) for r in range(sp)])
    return data_group, mpu.get_sequence_parallel_group()


def engine_mpu(ds_config: dict[str, Any]):
    """The ``mpu`` deepspeed.initialize needs under SP (DeepSpeed's SP state module), else None."""
    if ds_config.get("sequence_parallel_size", 1) == 1:
        return None
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    return mpu


def score_group(dp_group: Any, sp_group: Any) -> Any:
    """The group CE-LoRA scores are summed over: DP, or SP x DP (DeepSpeed's sequence-data-parallel group)."""
    if sp_group is None:
        return dp_group
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    return mpu.get_sequence_data_parallel_group()


def shard(micro: dict[str, Any], sp_group: Any, device) -> dict[str, Any]:
    """This rank's shard of ``micro`` (the same padded micro-batch on every rank of ``sp_group``):
    input_ids, position_ids and shift_labels, cut by DeepSpeed's UlyssesSPDataLoaderAdapter.

    The micro-batch is right-padded to a multiple of the SP size first (pad labels -100,
    positions continuing): with causal attention and right padding the real tokens see
    exactly what they saw, so the attention mask (which Ulysses does not carry) is dropped.
    The adapter yields one micro-batch per SP rank's input; here every rank's input is the
    same, so the first is this rank's shard of it (the rest are copies; an all-gather of
    token ids, negligible next to the model)."""
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    sp = dist.get_world_size(sp_group)
    ids, labels = micro["input_ids"], micro["labels"]
    pad = -ids.shape[1] % sp
    if pad:
        ids = torch.nn.functional.pad(ids, (0, pad), value=0)
        labels = torch.nn.functional.pad(labels, (0, pad), value=-100)
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    batch = {"input_ids": ids, "position_ids": positions, "labels": labels}
    adapter = UlyssesSPDataLoaderAdapter([batch], sp_rank=dist.get_rank(sp_group), sp_group=sp_group,
                                         sp_world_size=sp, device=device)
    # contiguous: the adapter's cut of a (B > 1, T) tensor is a strided view, which HF's loss .view()s
    return {k: v.to(device).contiguous() for k, v in next(iter(adapter)).items()}


def _grad_scale(engine, sp: int) -> int:
    """N under ZeRO-3's reduce-scatter (it averages over all ranks, SP peers included), else 1."""
    if engine.zero_optimization_stage() == 3 and engine._config.zero_config.reduce_scatter:
        return sp
    return 1


def micro_loss(engine, micro: dict[str, Any], sp_group: Any):
    """The micro-batch's training loss: ``engine(**micro).loss`` without SP.

    Under SP the value is the full sequences' mean token loss (what is logged), its gradient
    this rank's share of it (module docstring): local loss sum / the SP group's valid-token
    count, through the model's own loss (HF's or the chunked one, --loss-chunk) as
    ``shift_labels`` + ``num_items_in_batch``."""
    if sp_group is None:
        return engine(**micro).loss
    import torch
    import torch.distributed as dist

    part = shard(micro, sp_group, engine.device)
    targets = part["shift_labels"]
    count = (targets != -100).sum().to(torch.float32)
    dist.all_reduce(count, group=sp_group)
    local = engine(input_ids=part["input_ids"], position_ids=part["position_ids"], labels=targets,
                   shift_labels=targets, num_items_in_batch=count.clamp_min(1)).loss
    full = local.detach().clone()
    dist.all_reduce(full, group=sp_group)
    backward = local * _grad_scale(engine, dist.get_world_size(sp_group))
    return backward + (full - backward).detach()  # value: the full loss; gradient: this shard's
