"""Running the TP CE-LoRA layers under a DeepSpeed engine (ZeRO 0-2).

DeepSpeed's own TP (``"tensor_parallel": {"autotp_size": N}``) creates the TP/DP
process groups and, by default, shards every nn.Linear with AutoTP. Our layers are
already sharded (and their ``base_layer`` is an nn.Linear AutoTP would shard
again), so the recipe is:

    deepspeed.init_distributed()
    tp_group, dp_group = init_tp_groups(tp_size)      # DeepSpeed's groups, created early
    model = inject_celora(model, cfg); parallelize_celora(model, tp_group)
    mark_tensor_parallel(model)                       # engine: skip AutoTP sharding
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
        config={..., "tensor_parallel": {"autotp_size": tp_size}, "zero_optimization": {"stage": 1}})
    ...; engine.backward(loss); engine.step(); on_optimizer_step(engine.module, dp_group)

The engine then reduces gradients over the DP group only and checks that the
batches of a TP group agree.
"""
from __future__ import annotations

from typing import Any

from torch import nn


def init_tp_groups(tp_size: int) -> tuple[Any, Any]:
    """Create (or fetch) DeepSpeed's TP and DP groups; returns (tp_group, dp_group).

    Uses the same function the engine calls for ``autotp_size`` (a no-op when the
    groups exist), so the groups we shard with are the ones the engine reduces over.
    Needs torch.distributed initialised (``deepspeed.init_distributed``).
    """
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=tp_size)
    return groups.get_tensor_model_parallel_group(), groups.get_data_parallel_group()


def mark_tensor_parallel(model: nn.Module) -> nn.Module:
    """Tell the DeepSpeed engine the model is already TP-sharded (skips AutoTP)."""
    model.ds_autotp_parsed = True
    return model
