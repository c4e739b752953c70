"""Hugging Face causal LMs whose training loss comes from the chunked LM-head loss.

``enable_chunked_loss(model, chunk)`` gives ``model`` (an HF ``*ForCausalLM``, before or
after PEFT wraps it) a forward that, in training mode with labels, runs the decoder body
(``model.base_model``) and :func:`celora_dist.chunked_loss.chunked_lm_head_loss` on its last
hidden state with ``model.get_output_embeddings()`` -- an ``nn.Linear`` or the vocab-sparse
head -- and returns ``CausalLMOutputWithPast(loss=..., logits=None)``. Every other call
(evaluation, generation, no labels, ``logits_to_keep``) is the original forward, so nothing
that reads logits changes. The forward is replaced on the instance (the pattern of TRL's
``add_fused_lm_head``): state_dict keys, PEFT, DeepSpeed's engine and ``torch.compile``
see the same module; ``disable_chunked_loss`` restores it.

Exact only where the model's own forward is ``base_model → lm_head → [softcap] →
ForCausalLMLoss``: :data:`SUPPORTED` lists the families read in transformers 5.24
(``tests/test_chunked_loss.py`` re-reads their source, so a transformers change that breaks
the pattern fails a test instead of a loss). Cohere's ``logit_scale``, Granite's
``logits_scaling`` and the others are not on the list: refused, not approximated.
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Any

from torch import nn

from .chunked_loss import chunked_lm_head_loss
from .head import VocabSparseLMHead

# model_type -> the config field of its final-logit softcap (None: no softcap)
SUPPORTED: dict[str, str | None] = {
    "llama": None, "mistral": None, "qwen2": None, "qwen3": None, "gemma": None, "phi3": None,
    "gemma2": "final_logit_softcapping", "gemma3_text": "final_logit_softcapping",
}
# Tokens per chunk of the trainer's default (--loss-chunk) and of enable_chunked_loss. Measured on
# SmolLM2-135M's head (V = 49,152, d = 576, fp32, 2 CPU threads; BENCHMARKS.md "Chunked LM-head
# loss"): the head's loss forward + backward at chunk 256 / 512 / 1024 / 2048 took 1.16 / 1.02-1.06 /
# 0.92-0.94 / 0.87-0.89x the full logits' time at T = 2048 and 4096, peaking at 98 / 156 / 262 / 465 MB
# against 2,327 MB (T = 4096). 1024 is the smallest chunk no slower than the full path; the peak is
# one (chunk, V) fp32 block: 200 MB here, 525 MB at LLaMA-3's 128K vocabulary, 1 GB at Gemma's 256K.
DEFAULT_CHUNK = 1024

_LOSS_ONLY = ("num_items_in_batch", "shift_labels", "ignore_index")


def _causal_lm(model: nn.Module) -> nn.Module:
    """The HF ``*ForCausalLM`` itself when ``model`` is a ``peft.PeftModel`` around it."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the chunked loss would not be exactly ``model``'s own loss, or None when it would."""
    model = _causal_lm(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        return (f"{type(model).__name__} (model_type {model_type!r}) is not one of the families whose head and "
                f"loss it reproduces ({', '.join(sorted(SUPPORTED))})")
    from transformers.loss.loss_utils import ForCausalLMLoss

    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return f"{type(model).__name__} has a custom loss_function (not transformers' ForCausalLMLoss)"
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear and not isinstance(head, VocabSparseLMHead):
        return f"its LM head is a {type(head).__name__}, not an nn.Linear (a wrapped head computes something else)"
    return None


def enable_chunked_loss(model: nn.Module, chunk: int = DEFAULT_CHUNK) -> nn.Module:
    """Make ``model``'s training loss the chunked one (in place; returns ``model``).

    ``chunk``: tokens per chunk; the largest transient is a (chunk, vocab) fp32 block.
    Calling it again changes the chunk. Raises ValueError for a model it cannot reproduce
    exactly (:func:`unsupported_reason`) or a chunk below 1."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"enable_chunked_loss: chunk must be a positive number of tokens, got {chunk!r}")
    lm = _causal_lm(model)
    reason = unsupported_reason(lm)
    if reason is not None:
        raise ValueError(f"enable_chunked_loss: {reason}")
    if not is_chunked(lm):
        lm.celora_forward_before_chunking = vars(lm).get("forward")  # None: the class's forward
        names = tuple(p.name for p in inspect.signature(type(lm).forward).parameters.values()
                      if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)[1:]  # after self

        @functools.wraps(type(lm).forward)  # the original signature: generate and the HF Trainer inspect it
        def forward(self, *args: Any, **kwargs: Any):
            return _forward(self, names, *args, **kwargs)

        forward.celora_chunked = True
        lm.forward = types.MethodType(forward, lm)  # a bound method: deepcopy rebinds it to the copy
    lm.celora_loss_chunk = chunk
    return model


def is_chunked(model: nn.Module) -> bool:
    """Whether :func:`enable_chunked_loss` is in effect on ``model``."""
    return getattr(vars(_causal_lm(model)).get("forward"), "celora_chunked", False)


def disable_chunked_loss(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_chunked_loss` (a no-op when it is not enabled)."""
    lm = _causal_lm(model)
    if is_chunked(lm):
        before = lm.celora_forward_before_chunking
        if before is None:
            del lm.forward
        else:
            lm.forward = before
        del lm.celora_forward_before_chunking, lm.celora_loss_chunk
    return model


def _forward(lm: nn.Module, names: tuple[str, ...], *args: Any, **kwargs: Any):
    """The chunked path for a training call with labels; the forward it replaced for every other call."""
    named = {**dict(zip(names, args)), **kwargs} if len(args) <= len(names) else None
    keep = 0 if named is None else named.get("logits_to_keep", 0)
    if (named is None or not lm.training or (named.get("labels") is None and named.get("shift_labels") is None)
            or not (isinstance(keep, int) and keep == 0)):
        before = lm.celora_forward_before_chunking
        # the class's function with self passed, not the bound method: Dynamo resolves a module's bound
        # `forward` through the instance attribute, i.e. back to this function (infinite recursion under
        # torch.compile, seen in the trainer's evaluation)
        return before(*args, **kwargs) if before is not None else type(lm).forward(lm, *args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    labels = named.pop("labels", None)
    named.pop("logits_to_keep", None)
    loss_kwargs = {k: named.pop(k) for k in _LOSS_ONLY if k in named}
    return_dict = named.pop("return_dict", None)
    outputs = lm.base_model(**named)
    softcap_field = SUPPORTED[lm.config.model_type]
    loss = chunked_lm_head_loss(outputs.last_hidden_state, lm.get_output_embeddings(), labels,
                                chunk=lm.celora_loss_chunk,
                                softcap=getattr(lm.config, softcap_field) if softcap_field else None, **loss_kwargs)
    out = CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                 attentions=outputs.attentions)
    return out.to_tuple() if return_dict is False else out
