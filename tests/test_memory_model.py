"""celora_dist.memory_model against what autograd really saves, and its arithmetic.

The reference for the activation term is the set of tensors autograd saves in a real forward of
transformers' Llama (``torch.autograd.graph.saved_tensors_hooks``, storages counted once, the
frozen parameters left out), per token and layer: the difference between 2 and 1 layers and
between 2T and T tokens, so embeddings, the head and fixed buffers cancel. Tolerance 1 %:
measured on the shapes below at 0.1-0.2 % (the per-token rstd and log-sum-exp rows are not
always separate storages).
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from celora_dist import CELoRAConfig, inject_celora
from celora_dist.costmodel import MODEL_SHAPES, ModelShape
from celora_dist.memory_model import (CHUNK_COPIES, HEAD_COPIES, layer_saved_elements, longest_sequence,
                                      step_memory)

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA = CELoRAConfig(keep={}, exact=SEVEN, r=8)


def _llama(layers: int, hidden: int, inter: int, heads: int, kv: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=kv, vocab_size=64,
                                        attn_implementation="sdpa"))


def _saved_bytes(model, tokens: int, checkpointing: bool) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters() if not p.requires_grad}
    return sum(n for ptr, n in storages.items() if ptr not in frozen)


def _per_token_layer_elements(dims: tuple, cfg: CELoRAConfig, checkpointing: bool) -> float:
    per_token = {}
    for layers in (1, 2):
        counts = []
        for tokens in (32, 64):
            model = _llama(layers, *dims)
            inject_celora(model, cfg, verbose=False)
            counts.append(_saved_bytes(model, tokens, checkpointing))
        per_token[layers] = (counts[1] - counts[0]) / 32
    return (per_token[2] - per_token[1]) / 4  # fp32 elements


@pytest.mark.parametrize("dims", [(64, 96, 4, 2), (96, 160, 6, 3)])
def test_saved_activations_per_layer_match_autograd(dims):
    shape = ModelShape(hidden=dims[0], intermediate=dims[1], layers=1, heads=dims[2], kv_heads=dims[3], vocab=64)
    for cfg in (LORA, CELoRAConfig(r=8, r0=8)):  # CE-LoRA saves what LoRA does (dX needs no extra activation)
        measured = _per_token_layer_elements(dims, cfg, checkpointing=False)
        predicted = layer_saved_elements(shape, cfg.r, len(cfg.target_modules))
        assert abs(predicted - measured) / measured < 0.01, (cfg, predicted, measured)
    # under checkpointing a layer keeps only its input: exactly d elements per token
    assert _per_token_layer_elements(dims, LORA, checkpointing=True) == dims[0]


def test_step_memory_terms_follow_the_written_formula():
    shape = MODEL_SHAPES["smollm2-135m"]
    T, V, d, L = 4096, shape.vocab, shape.hidden, shape.layers
    per_layer = layer_saved_elements(shape, 16, 7)
    lora = CELoRAConfig(keep={}, exact=SEVEN, r=16)
    full = step_memory(shape, lora, T)
    assert full.head == HEAD_COPIES * T * V * 4
    assert full.activations == (L + 1) * per_layer * T * 4
    chunked = step_memory(shape, lora, T, loss_chunk=1024)
    assert chunked.head == CHUNK_COPIES * 1024 * V * 4 and chunked.activations == full.activations
    ckpt = step_memory(shape, lora, T, checkpointing=True)
    assert ckpt.activations == (L * d + 2 * per_layer) * T * 4  # + the recomputed layer and its gradients
    # SP 4: a quarter of the tokens' activations and head per rank; ZeRO-3 over 8: 1/8 of the frozen weights
    sp = step_memory(shape, lora, T, sequence_parallel=4, world=8, zero_stage=3)
    assert sp.activations == pytest.approx(full.activations / 4) and sp.head == pytest.approx(full.head / 4)
    frozen_params = L * (sum(m * n for _, m, n in shape.projections()) + 2 * d) + V * d
    lora_params = L * 16 * sum(m + n for _, m, n in shape.projections())
    assert sp.weights == pytest.approx(frozen_params / 8 * 4 + lora_params * 4)
    assert sp.trainable_state == pytest.approx(lora_params * (4 + 4 / 2 + 8 / 2))  # DP = 8 / 4
    # CE-LoRA adds its frozen factors B0, A0 for the approximate layers only (v, o, up, down)
    released = step_memory(shape, CELoRAConfig(), T)
    approx = [(m, n) for name, m, n in shape.projections() if name in CELoRAConfig().keep]
    lora_released = L * 14 * sum(m + n for name, m, n in shape.projections() if name in CELoRAConfig().target_modules)
    assert released.weights == pytest.approx(frozen_params * 4 + L * 14 * sum(m + n for m, n in approx) * 4
                                             + lora_released * 4)


def test_longest_sequence_is_the_last_that_fits():
    shape = MODEL_SHAPES["llama-3-8b"]
    kw = dict(checkpointing=True, loss_chunk=1024, sequence_parallel=8, world=8, zero_stage=3, weight_bytes=2,
              activation_bytes=2, untied_head=True)
    budget = 80e9
    T = longest_sequence(shape, CELoRAConfig(), budget, **kw)
    assert T % 256 == 0 and T > 0
    assert step_memory(shape, CELoRAConfig(), T, **kw).total <= budget
    assert step_memory(shape, CELoRAConfig(), T + 256, **kw).total > budget
    assert longest_sequence(shape, CELoRAConfig(), 1e6, **kw) == 0  # not even the weights fit
