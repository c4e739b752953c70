"""CE-LoRA inside Hugging Face ``Trainer`` and TRL's ``SFTTrainer`` (and so axolotl-style stacks).

    model, callback = celora_dist.for_trainer(model, CELoRAConfig())
    trainer = SFTTrainer(model=model, args=..., train_dataset=..., callbacks=[callback])

The model becomes a genuine ``peft.PeftModel`` with PEFT's own LoRA layers: each
approximate target's frozen linear is replaced by a ``CELoRALinear(r=0)`` (the frozen
weight with the CE-LoRA backward, no LoRA branch of its own) that PEFT's
``lora.Linear`` wraps as its base layer; exact targets get PEFT's plain LoRA. So
everything the Trainer does for PEFT models holds unchanged: ``checkpoint-N`` holds
the adapter and optimizer state, not the frozen backbone (DeepSpeed checkpoints with
``exclude_frozen_parameters``); ZeRO-3 saves gather the adapter; adapters are plain
PEFT LoRA adapters (``PeftModel.from_pretrained`` on the base model, no celora_dist
needed). The callback adds what the Trainer cannot know about (docs/design.md §8):
the schedule advanced once per optimizer step with scores summed over the
data-parallel world, the schedule state in each ``checkpoint-N`` and restored on
resume, and the layers' dX error in the Trainer's logs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn
from transformers import TrainerCallback

from ..adapters import peft_lora_config
from ..chunked_forward import enable_chunked_loss, unsupported_reason
from ..config import CELoRAConfig
from ..factor_plan import user_cache_dir
from ..inject import inject_celora_backward
from ..layer import CELoRALinear, register_zero3_params
from ..quant.layer import CELoRAQuantLinear
from ..schedule import celora_state_dict, load_celora_state_dict, on_optimizer_step, telemetry

STATE_FILE = "celora_state.pt"  # in each checkpoint-N: the CE-LoRA schedule state


def for_trainer(model: nn.Module, cfg: CELoRAConfig | None = None, *, verbose: bool = True,
                factor_cache: str | os.PathLike | None = "default",
                loss_chunk: int | None = None) -> tuple[PeftModel, "CELoRACallback"]:
    """Prepare a causal LM for ``Trainer`` / ``SFTTrainer``: returns (peft_model, callback).

    ``model``: a plain (not yet PEFT-wrapped) Hugging Face model. Pass the callback to
    the trainer (``callbacks=[callback]``) and give the trainer no ``peft_config`` (the
    model already is one). Under torch.distributed this is collective (the SVD splits
    are shared out over the ranks, see ``celora_dist/factor_plan.py``). ``factor_cache``:
    a folder for the SVD splits, by default the trainer's ($CELORA_CACHE/factors or
    ~/.cache/celora_dist/factors); None recomputes them every time. ``loss_chunk``: tokens
    per chunk of the chunked LM-head loss (``celora_dist/chunked_forward.py``; the model's
    training forward with labels then never holds the (T, V) logits and returns
    ``logits=None``), None to keep HF's path. Plain ``Trainer`` benefits; TRL's
    ``SFTTrainer`` computes its loss through its own chunked head (``fused_lm_head=True``),
    which reads the head's weight directly, so there neither this nor a vocab-sparse head's
    backward runs.
    """
    if factor_cache == "default":
        factor_cache = user_cache_dir() / "factors"
    if isinstance(model, PeftModel):
        raise ValueError("for_trainer: the model is already a PeftModel; pass the base model (for_trainer "
                         "adds the LoRA adapter itself, with CE-LoRA's backward under it)")
    cfg = cfg or CELoRAConfig()
    if loss_chunk is not None:  # before any SVD: an unsupported model costs nothing
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"for_trainer: loss_chunk: {reason}")
    inject_celora_backward(model, cfg, verbose=verbose, factor_cache=factor_cache)
    lora_config = peft_lora_config(cfg, list(cfg.target_modules), getattr(model.config, "name_or_path", None))
    # PEFT's documented (experimental) hook for LoRA on a custom layer type: its own
    # lora.Linear, with our CELoRALinear as the base layer it calls; on a quantized base PEFT's
    # QLoRA layer for that storage (first match wins), so merge_and_unload dequantizes, merges and
    # re-quantizes as for any PEFT QLoRA model (its generic lora.Linear would add to packed bytes).
    lora_config._register_custom_module({CELoRAQuantLinear: _peft_qlora_layer, CELoRALinear: PeftLoraLinear})
    peft_model = get_peft_model(model, lora_config)
    register_zero3_params(peft_model)
    if loss_chunk is not None:
        enable_chunked_loss(peft_model, loss_chunk)
    return peft_model, CELoRACallback(peft_model)


def _peft_qlora_layer(target: nn.Module, adapter_name: str, **kwargs: Any) -> nn.Module:
    """PEFT's LoRA layer for a quantized CE-LoRA base layer: ``lora.bnb.Linear4bit`` / ``Linear8bitLt``
    (their merge and dtype handling know bitsandbytes' storage; their forward calls our layer)."""
    from peft.tuners.lora import bnb as peft_bnb

    cls = peft_bnb.Linear8bitLt if target.quant_type == "int8" else peft_bnb.Linear4bit
    return cls(target, adapter_name, **kwargs)


class CELoRACallback(TrainerCallback):
    """Drives the CE-LoRA schedule inside a ``transformers.Trainer`` (see module docstring).

    ``resume_from``: a checkpoint folder to read the schedule state from when the
    Trainer resumes from somewhere other than ``output_dir/checkpoint-<step>``.
    """

    def __init__(self, model: nn.Module, resume_from: str | os.PathLike | None = None) -> None:
        self.model = model
        self.resume_from = resume_from

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return
        folder = Path(self.resume_from or Path(args.output_dir) / f"checkpoint-{state.global_step}")
        path = folder / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"CE-LoRA: the Trainer resumes at step {state.global_step} but {path} does not exist, so the "
                "CE-LoRA schedule (step, kept indices) cannot continue; pass "
                "CELoRACallback(model, resume_from='<the checkpoint folder>') if it lives elsewhere")
        load_celora_state_dict(self.model, torch.load(path, map_location="cpu", weights_only=True))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # The Trainer's data-parallel group is the world (DDP or DeepSpeed; no TP). With
        # fp16=True accelerate's optimizer says whether its loss scaler skipped the step.
        on_optimizer_step(self.model, skipped=bool(getattr(optimizer, "step_was_skipped", False)))

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0) or not folder.is_dir():
            return
        tmp = folder / f".{STATE_FILE}.tmp-{os.getpid()}"
        torch.save(celora_state_dict(self.model), tmp)
        os.replace(tmp, folder / STATE_FILE)

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        errors = [entry["rel_error"] for entry in telemetry(self.model).values() if entry["rel_error"] is not None]
        if logs is not None and errors:
            logs["celora_dx_rel_error"] = round(sum(errors) / len(errors), 5)
