"""Model-level TP helpers: convert layers, gather the adapter, guard ZeRO-3.

``parallelize_celora`` swaps a model's CE-LoRA layers (or, given a config, its
plain target linears) for the TP versions the way Megatron shards a LLaMA block:
q/k/v/gate/up column-parallel, o/down row-parallel. Attention heads then split
over TP without touching the attention code, because HF reshapes projections with
``view(..., -1, head_dim)``; every rank must hold the same full model before the
call (same seed or same checkpoint), exactly as DeepSpeed AutoTP expects.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..adapters import PEFT_PREFIX, write_peft_adapter
from ..config import CELoRAConfig
from ..layer import CELoRALinear, celora_layers
from .comm import group_size
from .layers import ColumnParallelCELoRALinear, RowParallelCELoRALinear, _TPCELoRALinear

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def check_tp_zero_stage(tp_size: int, zero_stage: int) -> None:
    """Reject TP + ZeRO-3: DeepSpeed's TP trains with ZeRO 0-2, and these layers too."""
    if tp_size > 1 and zero_stage >= 3:
        raise ValueError(
            f"tensor parallelism (tp={tp_size}) cannot be combined with ZeRO stage {zero_stage}: "
            "use ZeRO stage 0, 1 or 2 with TP (DeepSpeed AutoTP has the same restriction)"
        )


def _role(name: str, column: Iterable[str], row: Iterable[str]) -> type[_TPCELoRALinear]:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in column:
        return ColumnParallelCELoRALinear
    if leaf in row:
        return RowParallelCELoRALinear
    raise ValueError(f"parallelize_celora: {name!r} is neither column-parallel {tuple(column)} "
                     f"nor row-parallel {tuple(row)}; pass column=/row= to classify it")


def _check_heads(name: str, parent: nn.Module, cls: type, module: nn.Module, tp: int) -> None:
    """Heads must not straddle TP ranks (attention modules expose ``head_dim``)."""
    head_dim = getattr(parent, "head_dim", None)
    if not isinstance(head_dim, int):
        return
    dim = module.out_features if cls is ColumnParallelCELoRALinear else module.in_features
    if dim % (tp * head_dim):
        raise ValueError(f"parallelize_celora: {name} has {dim // head_dim} heads of size {head_dim}, "
                         f"not divisible by TP size {tp}")


def parallelize_celora(
    model: nn.Module,
    tp_group: Any,
    cfg: CELoRAConfig | None = None,
    column: Iterable[str] = COLUMN_PARALLEL,
    row: Iterable[str] = ROW_PARALLEL,
) -> nn.Module:
    """Make ``model``'s CE-LoRA layers tensor parallel over ``tp_group`` (in place).

    If the model already has CE-LoRA layers (``inject_celora``), those are converted
    and their SVD factors and LoRA values reused. Otherwise ``cfg`` says which plain
    nn.Linear layers to convert (all parameters are frozen first, as inject_celora
    does) and each TP layer factors its full W0 once. Collective over ``tp_group``.
    Sets ``model.celora_tp = {"tp_size", "column", "row"}``.
    """
    column, row = tuple(column), tuple(row)
    if any(isinstance(m, _TPCELoRALinear) for m in model.modules()):
        raise ValueError("parallelize_celora: the model is already tensor parallel")
    existing = list(celora_layers(model))
    if existing:
        targets: list[tuple[str, nn.Module]] = existing
    else:
        if cfg is None:
            raise ValueError("parallelize_celora: the model has no CE-LoRA layers; pass cfg to convert "
                             "its plain linears")
        targets = [(n, m) for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and cfg.keep_for(n) is not None]
        if not targets:
            raise ValueError(f"parallelize_celora: no nn.Linear matches {cfg.target_modules}")
        for p in model.parameters():
            p.requires_grad_(False)
    tp = group_size(tp_group)
    done = {"column": [], "row": []}
    for name, module in targets:
        cls = _role(name, column, row)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        _check_heads(name, parent, cls, module, tp)
        if isinstance(module, CELoRALinear):
            layer = cls(module, tp_group)
        else:
            layer = cls(module, tp_group, **cfg.layer_kwargs(name))
        setattr(parent, child, layer)
        done[cls.parallel_mode].append(name)
    if cfg is not None and not existing:
        model.celora_config = cfg
    model.celora_tp = {"tp_size": tp, **done}
    return model


def gather_lora_state_dict(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Full PEFT-shaped LoRA tensors (or their gradients) under PEFT's key names, on CPU.

    TP layers are gathered over their TP group — every rank must call this;
    non-TP CE-LoRA layers contribute their own tensors.
    """
    state: dict[str, torch.Tensor] = {}
    for name, layer in celora_layers(model):
        if isinstance(layer, _TPCELoRALinear):
            A, B = layer.gather_lora(grads=grads)
        else:
            A, B = (_TPCELoRALinear._value(p, grads) for p in (layer.lora_A.weight, layer.lora_B.weight))
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.detach().cpu().clone()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.detach().cpu().clone()
    if not state:
        raise ValueError("gather_lora_state_dict: the model has no CE-LoRA layers")
    return state


def save_tp_adapter(model: nn.Module, directory: str | os.PathLike, base_model: str | None = None) -> Path:
    """PEFT-format adapter of a TP model, gathered to full shapes; global rank 0 writes.

    Every rank must call it (the gather is collective). The files load with
    ``peft.PeftModel.from_pretrained`` on a single, non-parallel process.
    """
    cfg: CELoRAConfig | None = getattr(model, "celora_config", None)
    if cfg is None:
        raise ValueError("save_tp_adapter: model has no celora_config (made by inject_celora or "
                         "parallelize_celora(cfg=...)?)")
    return write_peft_adapter(model, gather_lora_state_dict(model), directory, base_model)
