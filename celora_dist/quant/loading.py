"""How a base is loaded quantized: one ``BitsAndBytesConfig`` per ``--quantize`` choice, shared by the
trainer (``train/quantize.py``) and the merge (``merge.py``), so an adapter merges into the very base
it was trained on."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

QUANTIZE = ("nf4", "fp4", "int8")


def bnb_config(kind: str, compute_dtype: Any = None) -> Any:
    """QLoRA's 4-bit NF4/FP4 with double quantization and ``compute_dtype`` (default fp32), or
    LLM.int8 (frozen int8). Imports torch/transformers only when called (merge's CLI parses first)."""
    import torch
    from transformers import BitsAndBytesConfig

    compute_dtype = compute_dtype or torch.float32
    if kind not in QUANTIZE:
        raise ValueError(f"quantization {kind!r}: expected one of {QUANTIZE}")
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def stored_quantization_config(model_dir: str | Path) -> dict | None:
    """The ``quantization_config`` a model folder's config.json is saved with; None without one or when
    config.json is unreadable (whoever loads the folder reports that)."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config") or None
    except (OSError, ValueError):
        return None
