"""Merge a CE-LoRA adapter into its base model for deployment: a plain Hugging Face model folder.

    python -m celora_dist.merge --model BASE_DIR --adapter runs/x/adapter --out merged/

The adapter is an ordinary PEFT LoRA adapter (CE-LoRA changes only the backward), so the
merge is PEFT's own ``merge_and_unload``; the result loads with ``from_pretrained`` and
needs neither PEFT nor celora_dist. An adapter trained on a quantized base (CE-QLoRA: ``--quantize
nf4|fp4|int8``, or a folder stored quantized) is merged into the *dequantized* base — the weights it
was trained against — with ``--quantize`` naming how the base was loaded (a stored-quantized
``--model`` is detected): bitsandbytes quantizes, transformers' ``dequantize()`` restores dense
linears, then PEFT merges; the result is a dense model in ``--dtype``. The folder is written beside ``--out`` and renamed into
place, so an interrupted merge leaves nothing half-written; an existing ``--out`` is
refused unless ``--overwrite`` is given.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from .quant.loading import QUANTIZE

DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m celora_dist.merge", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="base model folder (the one the adapter was trained on)")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder (adapter_config.json + weights)")
    p.add_argument("--out", required=True, help="folder to write the merged model to")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the merged weights")
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="the adapter was trained on this quantized base (launch/train.py --quantize): merge "
                        "into its dequantized weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return p.parse_args(argv)


def stored_quantization_config(model_dir: str | Path) -> dict | None:
    """The ``quantization_config`` a model folder is saved with, or None."""
    return json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config") or None


def check_paths(args: argparse.Namespace) -> None:
    """Every path problem as one message naming the culprit, before anything is loaded."""
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"error: --model {args.model}: no config.json there (a Hugging Face model folder is needed)")
    if not (Path(args.adapter) / "adapter_config.json").is_file():
        raise SystemExit(f"error: --adapter {args.adapter}: no adapter_config.json there (a PEFT adapter folder "
                         "is needed, e.g. OUTPUT/adapter of launch/train.py)")
    if args.quantize and stored_quantization_config(args.model):
        raise SystemExit(f"error: --quantize {args.quantize}: --model {args.model} is stored quantized already; "
                         "drop --quantize (it is dequantized as stored)")
    if args.quantize or stored_quantization_config(args.model):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SystemExit("error: merging into a quantized base needs bitsandbytes: pip install "
                             "'bitsandbytes==0.50.2'") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: --out {out} already exists and is not empty; pass --overwrite to replace it")


def _base_model(model_dir: str | Path, dtype: str, quantize: str | None):
    """The base the adapter was trained on, dense: as stored, or quantized then dequantized."""
    import torch
    from transformers import AutoModelForCausalLM

    from .quant.loading import bnb_config

    torch_dtype = getattr(torch, dtype)
    if quantize is None and not stored_quantization_config(model_dir):
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    kwargs = {"quantization_config": bnb_config(quantize)} if quantize else {}  # else: as stored
    quantized = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, device_map="cpu", **kwargs)
    return quantized.dequantize().to(torch_dtype)


def merge(model_dir: str | Path, adapter_dir: str | Path, out: str | Path, dtype: str = "float32",
          quantize: str | None = None) -> Path:
    """Load base + adapter, fold the LoRA delta into the weights, save a plain model (+ tokenizer) to ``out``."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    base = _base_model(model_dir, dtype, quantize)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        merged.save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        except (OSError, ValueError):  # a model folder without a tokenizer: the weights are what matters
            pass
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_paths(args)
    out = merge(args.model, args.adapter, args.out, args.dtype, args.quantize)
    base = f"{args.model} (dequantized {args.quantize})" if args.quantize else args.model
    print(f"merged {args.adapter} into {base} -> {out} ({args.dtype}); "
          f"load with AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
