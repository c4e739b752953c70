"""The base model: its target modules checked from the config alone, then loaded.

:func:`check_targets` builds a weightless (meta-device) skeleton so a typo in the
CE-LoRA targets costs a config read, not a model load; :func:`load` reads the
tokenizer and the weights once every check has passed; :func:`chunk_loss` gives its
training forward the chunked LM-head loss (--loss-chunk).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import CELoRAConfig
from . import quantize as quantization
from .errors import UsageError


def check_targets(model_dir: str | Path, cfg: CELoRAConfig) -> None:
    """Fail before loading weights if a target module name is not in the model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as e:
        raise UsageError(f"--model {model_dir}: cannot read its config: {e}") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = {n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        raise UsageError(f"target module(s) {missing} are not in {model_dir} "
                         f"({type(skeleton).__name__}); its linear modules are {sorted(names)}")


def check_chat(model_dir: str | Path, template_file: str | None, record: dict) -> None:
    """The tokenizer renders chat records and the assistant turns can be located (UsageError otherwise)."""
    from transformers import AutoTokenizer

    from .chat import chat_ids, use_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    use_template(tokenizer, template_file)
    chat_ids(tokenizer, record["messages"], 10**9)


def load(model_dir: str | Path, dtype: str, seed: int, chat_template: str | None = None,
         quantize: str | None = None, attn_implementation: str | None = None) -> tuple[Any, Any]:
    """(tokenizer, causal LM in ``dtype`` "fp32"/"bf16", KV cache off for training).

    ``attn_implementation``: HF's choice when None; "sdpa" under --sequence-parallel (what
    DeepSpeed's Ulysses attention wraps, sequence.py).

    Seeds torch with ``seed`` first: every rank then draws the same LoRA initialisation
    when the CE-LoRA layers are injected next. ``quantize`` ("nf4"/"fp4"/"int8"): the linear
    layers are loaded quantized by bitsandbytes (``train/quantize.py``), ``dtype`` the compute dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if chat_template is not None:
        from .chat import use_template

        use_template(tokenizer, chat_template)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, **extra,
                                                 **quantization.load_kwargs(quantize, dtype))
    model.config.use_cache = False
    return tokenizer, model


def chunk_loss(model, tokens: int, verbose: bool) -> None:
    """--loss-chunk TOKENS (0: off): the chunked LM-head loss wherever it is exactly the model's own loss;
    elsewhere (celora_dist.chunked_forward.unsupported_reason) HF's full-logits path, said in a note."""
    from ..chunked_forward import enable_chunked_loss, unsupported_reason

    if tokens == 0:
        return
    reason = unsupported_reason(model)
    if reason is not None:
        if verbose:
            print(f"note: --loss-chunk: {reason}; the loss takes HF's full-logits path", flush=True)
        return
    enable_chunked_loss(model, tokens)
    if verbose:
        print(f"LM-head loss: {tokens} counted tokens per chunk (no logits for the whole micro-batch)", flush=True)
