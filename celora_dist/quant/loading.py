"""How a base is loaded quantized: one ``BitsAndBytesConfig`` per ``--quantize`` choice, shared by the
trainer (``train/quantize.py``) and the merge (``merge.py``), so an adapter merges into the very base
it was trained on."""
from __future__ import annotations

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
