"""Tensor-parallel CE-LoRA (docs/design.md §2); see docs/parallel.md.

    from celora_dist.parallel import parallelize_celora, save_tp_adapter
    model = inject_celora(model, cfg)                 # same full model on every rank
    parallelize_celora(model, tp_group)               # q/k/v/gate/up column, o/down row
    ...; loss.backward(); optimizer.step()
    on_optimizer_step(model, dp_group)                # DATA-parallel group, not the world
    save_tp_adapter(model, "out/adapter")             # gathered to PEFT shapes
"""
from .convert import (COLUMN_PARALLEL, ROW_PARALLEL, check_tp_zero_stage, gather_lora_state_dict,
                      parallelize_celora, save_tp_adapter)
from .deepspeed_tp import init_tp_groups, mark_tensor_parallel
from ..factors import residual_row_sq
from .layers import ColumnParallelCELoRALinear, RowParallelCELoRALinear, tp_layers

__all__ = [
    "ColumnParallelCELoRALinear",
    "RowParallelCELoRALinear",
    "parallelize_celora",
    "gather_lora_state_dict",
    "save_tp_adapter",
    "check_tp_zero_stage",
    "init_tp_groups",
    "mark_tensor_parallel",
    "residual_row_sq",
    "tp_layers",
    "COLUMN_PARALLEL",
    "ROW_PARALLEL",
]
