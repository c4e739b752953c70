"""Memory model of a LoRA / CE-LoRA training step per rank: how long a sequence fits.

The long-context question ("what is the longest T that trains?") for models and machines that
cannot be run here (docs/design.md §7). Pure arithmetic from a :class:`~celora_dist.costmodel.ModelShape`,
like :func:`~celora_dist.costmodel.step_flops`; ``bench/long_context.py`` puts it beside the
measured CPU table. Counted, in bytes per rank:

* **weights**: the frozen parameters at ``weight_bytes`` (1/world of them under ZeRO-3), CE-LoRA's
  frozen factors B0 (m × r0) and A0 (r0 × n) of its approximate layers, and the LoRA parameters;
* **trainable state**: LoRA's fp32 master copy, gradient and Adam moments (16 B per parameter, the
  gradient split over DP from ZeRO-2, the moments from ZeRO-1);
* **activations** saved for backward, per token and decoder layer, written out from transformers'
  Llama layer under sdpa (:func:`layer_saved_elements`; tests/test_memory_model.py counts the
  tensors autograd really saves), plus one layer's set live during backward (its gradients; under
  checkpointing also the recomputed layer's set). With checkpointing a layer keeps only its input;
* **LM head**: the (T × V) logits, in fp32 as the loss upcasts them, ``HEAD_COPIES`` times (logits,
  log-softmax, its gradient: measured 2.86-2.89 copies on SmolLM2's head at 2,048 / 4,096 tokens,
  BENCHMARKS.md "Chunked LM-head loss"); the chunked loss holds a chunk's worth instead;
* **sequence parallel** (Ulysses): each rank holds T / sp tokens of every activation and of the
  head; attention runs on whole sequences of heads / sp heads, the same element count;
* **overhead**: the runtime's own (CUDA context and allocator slack, or a CPU process's libraries).

Not counted: the all-to-all buffers of Ulysses (a layer's q, k, v in flight), fragmentation beyond
the overhead, and ZeRO-3's gathered layer (one layer's frozen weights at a time).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import CELoRAConfig
from .costmodel import ModelShape

HEAD_COPIES = 3.0  # (T, V) fp32 tensors alive at the head's peak: measured 2.86-2.89 (module docstring)
CHUNK_COPIES = 1.1  # the chunked loss at chunk C: measured 217 MB for C = 1024 on SmolLM2 (1.08 (C, V) copies)
ADAM_STATE_BYTES = 16  # fp32 master, gradient, exp_avg, exp_avg_sq per trainable parameter


def layer_saved_elements(shape: ModelShape, lora_r: int, lora_targets: int) -> float:
    """Elements autograd saves per token in one Llama decoder layer (sdpa attention, SiLU MLP):

    two RMSNorms (input and normed output, 2 × (d + 1) + 2 × d, the rstd per token), the query
    after RoPE and the attention output (2 × q_dim; o_proj's input is that output's storage),
    key and value (2 × kv_dim), the attention's log-sum-exp (one per head), the MLP's gate and up
    outputs, SiLU(gate) and the product down_proj reads (4 × intermediate), and each adapter's
    rank-r activation A x (r per targeted linear)."""
    d, q, kv, i = shape.hidden, shape.attn_dim, shape.kv_dim, shape.intermediate
    return 4 * d + 2 + 2 * q + 2 * kv + shape.heads + 4 * i + lora_r * lora_targets


@dataclass(frozen=True)
class StepMemory:
    """Predicted bytes per rank of one training step at ``seq_len`` tokens."""

    seq_len: int
    weights: float
    trainable_state: float
    activations: float
    head: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.trainable_state + self.activations + self.head + self.overhead


def _frozen_and_lora_params(shape: ModelShape, cfg: CELoRAConfig) -> tuple[float, float, float]:
    """(frozen parameters, CE-LoRA factor parameters, LoRA parameters) of the whole model."""
    frozen = factors = lora = 0.0
    for name, m, n in shape.projections():
        frozen += m * n
        keep = cfg.keep_for(name)
        if keep is None:
            continue
        lora += cfg.r * (m + n)
        if keep != 1.0:  # approximate (a fraction or "auto"): B0, A0 kept beside W0
            factors += cfg.r0 * (m + n)
    per_layer_norms = 2 * shape.hidden
    embeddings = shape.vocab * shape.hidden  # tied head: counted once (SmolLM2); an untied one adds V·d
    L = shape.layers
    return L * (frozen + per_layer_norms) + embeddings, L * factors, L * lora


def step_memory(shape_or_model, cfg: CELoRAConfig, seq_len: int, *, checkpointing: bool = False,
                loss_chunk: int | None = None, sequence_parallel: int = 1, world: int = 1, zero_stage: int = 2,
                weight_bytes: int = 4, activation_bytes: int = 4, overhead_bytes: float = 2 ** 30,
                untied_head: bool = False) -> StepMemory:
    """Bytes per rank of one step (module docstring). ``world`` ranks in all, ``sequence_parallel``
    of them sharing each sequence (DP = world / sp); ``loss_chunk`` None: the full logits."""
    shape = ModelShape.of(shape_or_model)
    frozen, factors, lora = _frozen_and_lora_params(shape, cfg)
    if untied_head:
        frozen += shape.vocab * shape.hidden
    dp = max(1, world // sequence_parallel)
    weights = (frozen / (world if zero_stage >= 3 else 1)) * weight_bytes + factors * weight_bytes + lora * 4
    state = lora * (4 + (4 / dp if zero_stage >= 2 else 4) + (8 / dp if zero_stage >= 1 else 8))
    targets = sum(cfg.keep_for(name) is not None for name, _, _ in shape.projections())
    per_layer = layer_saved_elements(shape, cfg.r, targets)
    tokens = seq_len / sequence_parallel
    # live in backward besides what the layers keep: one layer's gradients, and under checkpointing
    # also the layer's recomputed activations
    kept_per_layer, live = (shape.hidden, 2 * per_layer) if checkpointing else (per_layer, per_layer)
    activations = (shape.layers * kept_per_layer + live) * tokens * activation_bytes
    # a chunk as long as the sequence still saves: measured 880 -> 708 MB at 512 tokens, chunk 1024
    head_tokens, copies = (tokens, HEAD_COPIES) if loss_chunk is None else (min(tokens, loss_chunk), CHUNK_COPIES)
    head = copies * head_tokens * shape.vocab * 4
    return StepMemory(seq_len, weights, state, activations, head, overhead_bytes)


def longest_sequence(shape_or_model, cfg: CELoRAConfig, budget_bytes: float, multiple: int = 256,
                     **kwargs) -> int:
    """The longest ``seq_len`` (a multiple of ``multiple``) whose :func:`step_memory` total fits
    ``budget_bytes`` per rank; 0 when not even ``multiple`` tokens fit. Same keywords as step_memory."""
    if step_memory(shape_or_model, cfg, multiple, **kwargs).total > budget_bytes:
        return 0
    lo, hi = multiple, multiple
    while step_memory(shape_or_model, cfg, hi, **kwargs).total <= budget_bytes:
        lo, hi = hi, hi * 2
        if hi > 2 ** 40:
            raise ValueError("the memory model does not grow with seq_len; check its arguments")
    while hi - lo > multiple:  # total grows with T: bisect on the multiple's grid
        mid = (lo + hi) // 2 // multiple * multiple
        lo, hi = (mid, hi) if step_memory(shape_or_model, cfg, mid, **kwargs).total <= budget_bytes else (lo, mid)
    return lo
