"""Adapters in PEFT's format: save, load, merge.

The adapter is the trainable LoRA delta only (B0/A0 are recomputed from the base
weights), so ``peft.PeftModel.from_pretrained(base, dir)`` loads it for inference
as a plain LoRA adapter. Files are written into a temporary sibling directory and
renamed into place, so an interrupted save never leaves a half-written adapter.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn

from .config import CELoRAConfig
from .layer import celora_layers
from .zero import gathered

if TYPE_CHECKING:
    from peft import LoraConfig

# peft is imported where it is used: it costs ~9 s of `import celora_dist` on 2 busy cores
# (6 s of it peft.utils.constants), paid by every process that only trains or runs kernels.

PEFT_PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA tensors under PEFT's key names, gathered from ZeRO-3 partitions, on CPU."""
    state = {}
    for name, layer in celora_layers(model):
        if layer.r == 0:
            raise ValueError(f"save_adapter: {name} has no LoRA branch of its own (r=0: the base layer of a PEFT "
                             "LoRA, as celora_dist.for_trainer builds); save the PeftModel with save_pretrained")
        with gathered([layer.lora_A.weight, layer.lora_B.weight]):
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().clone()
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().clone()
    if not state:
        raise ValueError("save_adapter: the model has no CE-LoRA layers (call inject_celora first)")
    return state


def peft_lora_config(cfg: CELoRAConfig, target_modules: list[str], base_model: str | None = None) -> LoraConfig:
    """The PEFT LoraConfig describing our trainable delta (r, alpha, rsLoRA, targets)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        use_rslora=cfg.rslora,
        lora_dropout=cfg.dropout,
        target_modules=sorted(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def _replace_dir_atomically(tmp: Path, final: Path) -> None:
    """Move a finished ``tmp`` directory to ``final``, replacing any previous one."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format).

    Under torch.distributed every rank must call it (ZeRO-3 gathers are collective);
    rank 0 writes. Returns the directory.
    """
    if getattr(model, "celora_config", None) is None:
        raise ValueError("save_adapter: model has no celora_config (was it made by inject_celora?)")
    return write_peft_adapter(model, adapter_state_dict(model), directory, base_model)


def write_peft_adapter(model: nn.Module, state: dict[str, torch.Tensor], directory: str | os.PathLike,
                       base_model: str | None = None) -> Path:
    """Write gathered LoRA tensors ``state`` with the model's config; global rank 0 writes, atomically."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME

    cfg: CELoRAConfig = model.celora_config
    final = Path(directory)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return final
    targets = sorted({name.rsplit(".", 1)[-1] for name, _ in celora_layers(model)})
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        peft_lora_config(cfg, targets, base_model).save_pretrained(str(tmp))
        save_file(state, str(tmp / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        _replace_dir_atomically(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT-format LoRA adapter into the CE-LoRA layers of ``model`` (in place)."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, load_peft_weights

    directory = Path(directory)
    weights_file = directory / SAFETENSORS_WEIGHTS_NAME
    if not weights_file.is_file():
        raise FileNotFoundError(f"load_adapter: no {SAFETENSORS_WEIGHTS_NAME} in {directory}")
    state = load_peft_weights(str(directory), device="cpu")
    layers = dict(celora_layers(model))
    expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"load_adapter: {directory} does not match the model's CE-LoRA layers "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for name, layer in layers.items():
        params = [layer.lora_A.weight, layer.lora_B.weight]
        with torch.no_grad(), gathered(params, modifier_rank=0):
            for ab, param in zip("AB", params):
                src = state[f"{PEFT_PREFIX}{name}.lora_{ab}.weight"]
                if src.shape != param.shape:
                    raise ValueError(f"load_adapter: {name}.lora_{ab} has shape {tuple(src.shape)}, "
                                     f"the model expects {tuple(param.shape)}")
                param.copy_(src.to(param.dtype))
    return model


def merge_celora(model: nn.Module) -> nn.Module:
    """Fold every LoRA delta into its base weight and put plain nn.Linear layers back."""
    replacements = [(name, layer.merged_linear()) for name, layer in celora_layers(model)]
    for name, linear in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear)
    if hasattr(model, "celora_config"):
        del model.celora_config
    return model
