"""TP=2 CE-LoRA inside a DeepSpeed engine (ZeRO-1, CPU/gloo) trains like TP=1.

Two spawned ranks build the same tiny Llama, shard it with parallelize_celora over
DeepSpeed's own TP group (init_tp_groups), mark it as already sharded and train
3 SGD steps through ``deepspeed.initialize(... "tensor_parallel": {"autotp_size": 2},
ZeRO stage 1, gradient_clipping 1.0)``. The parent trains the plain model (TP=1, no
DeepSpeed) with the same SGD and torch's clip_grad_norm_: losses and the gathered
LoRA weights must agree. If DeepSpeed reduced
gradients over the wrong group, or AutoTP re-sharded our layers, shards would be
mixed and the weights would differ by O(lr · grad).

The first engine init on a fresh machine JIT-builds a small shared-memory op
(RECIPES.md: 35-60 s once).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from celora_dist import on_optimizer_step
from celora_dist.parallel import gather_lora_state_dict, init_tp_groups, mark_tensor_parallel, parallelize_celora
from celora_dist.adapters import adapter_state_dict

from .test_tp import MODEL_TOL, WORLD, _build_model, _close, _sgd, _spawn

STEPS = 3
# Clipping is active (the first gradients' norm exceeds it): the global norm must count
# TP-sharded LoRA tensors on every rank and replicated ones once, as TP=1 does.
CLIP = 1.0


def _ds_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    tp_group, dp_group = init_tp_groups(WORLD)
    model, ids = _build_model("exact")
    mark_tensor_parallel(parallelize_celora(model, tp_group))
    config = {"train_micro_batch_size_per_gpu": ids.shape[0], "zero_optimization": {"stage": 1},
              "tensor_parallel": {"autotp_size": WORLD}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": CLIP,
              "steps_per_print": 10_000}
    engine, *_ = deepspeed.initialize(model=model, optimizer=_sgd(model), config=config)
    losses = []
    for _ in range(STEPS):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        on_optimizer_step(engine.module, dp_group)
        losses.append(loss.detach())
    state = gather_lora_state_dict(engine.module)
    torch.save({"losses": losses, "state": state}, Path(out_dir) / f"ds_rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_deepspeed_zero1_tp2_trains_like_tp1(tmp_path):
    _spawn(_ds_worker, str(tmp_path))
    runs = [torch.load(tmp_path / f"ds_rank{r}.pt") for r in range(WORLD)]

    model, ids = _build_model("exact")
    opt = _sgd(model)
    losses, norms = [], []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP)
        norms.append(float(norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    assert losses[-1] < losses[0]
    assert norms[0] > CLIP  # the clipping path really ran
    expected = adapter_state_dict(model)
    for run in runs:
        for step in range(STEPS):
            _close(run["losses"][step], losses[step], what=f"loss step {step}")
        assert run["state"].keys() == expected.keys()
        for key, value in expected.items():
            _close(run["state"][key], value, tol=MODEL_TOL, what=key)
    # the updates were real: weights moved by far more than the tolerance
    initial, _ = _build_model("exact")
    moved = max(float((expected[k] - v).abs().max() / v.abs().max())
                for k, v in adapter_state_dict(initial).items())
    assert moved > 100 * MODEL_TOL
