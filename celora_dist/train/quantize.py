"""``--quantize nf4|fp4|int8``: load the frozen base through bitsandbytes, for CE-QLoRA.

The base model is loaded quantized (``BitsAndBytesConfig``, the way TRL / axolotl load a
QLoRA base: NF4/FP4 with double quantization, or LLM.int8), on this rank's device, with
``--dtype`` as the compute dtype; ``inject_celora`` then gives every targeted layer the
CE-QLoRA backward (``celora_dist/quant/``). A folder that is already quantized (its
config.json carries a bitsandbytes ``quantization_config``) loads as stored without the flag.

What is refused, before any work (:func:`check`): bitsandbytes missing; ZeRO-3 (its
partitioning would split the packed 4-bit storage and its scales apart; the frozen base is
replicated under ZeRO 0-2, which partition only the adapters' optimizer state); tensor
parallelism (the TP layers shard a dense W0); ``--quantize`` on an already quantized folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..quant.loading import QUANTIZE, bnb_config
from .errors import UsageError

__all__ = ["QUANTIZE", "check", "load_kwargs", "stored_quantization"]


def stored_quantization(model_dir: str | Path) -> str | None:
    """The quant method a model folder is saved in ('bitsandbytes_4bit', 'gptq', ...) or None."""
    config = Path(model_dir) / "config.json"
    try:
        qc = json.loads(config.read_text()).get("quantization_config")
    except (OSError, ValueError):
        return None  # model.check_targets reports an unreadable config
    if not qc:
        return None
    method = qc.get("quant_method", "unknown")
    if method == "bitsandbytes":
        method += "_4bit" if qc.get("load_in_4bit") else "_8bit"
    return method


def check(args, model_dir: str | Path, zero_stage: int, tp: int) -> None:
    """UsageError for a quantized run this trainer cannot do (see module docstring)."""
    stored = stored_quantization(model_dir)
    if args.quantize is None and stored is None:
        return
    what = f"--quantize {args.quantize}" if args.quantize else f"--model {model_dir} (stored {stored})"
    if args.quantize and stored:
        raise UsageError(f"--quantize {args.quantize}: --model {model_dir} is already quantized ({stored}); "
                         "drop --quantize, it trains on the stored quantization")
    if stored and not stored.startswith("bitsandbytes"):
        raise UsageError(f"{what}: only bitsandbytes quantization (nf4, fp4, int8) has a CE-QLoRA layer")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UsageError(f"{what} needs bitsandbytes: pip install 'bitsandbytes==0.50.2' "
                         "(or the [quant] extra: pip install -e '.[quant]')") from None
    if zero_stage == 3:
        raise UsageError(f"{what}: ZeRO-3 would partition the packed quantized weights and their scales; "
                         "use ZeRO-2 (ds_configs/zero2.json): the frozen quantized base is replicated, the "
                         "adapters' optimizer state is partitioned")
    if tp > 1:
        raise UsageError(f"{what}: tensor parallelism shards a dense W0 and is not supported on a quantized "
                         "base; use data parallelism (ZeRO 0-2)")


def load_kwargs(kind: str | None, dtype: str) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments: quantize onto this rank's device (bitsandbytes quantizes
    while loading, so the weights never exist unquantized on the GPU)."""
    if kind is None:
        return {}
    import torch
    from deepspeed.accelerator import get_accelerator

    compute = torch.bfloat16 if dtype == "bf16" else torch.float32
    return {"quantization_config": bnb_config(kind, compute),
            "device_map": {"": get_accelerator().current_device_name()}}
