"""FLOP cost model of docs/design.md §3: what "fast" can mean for a config and a model.

Counts the base-linear work per token, the part CE-LoRA changes: forward 2mn per
linear, dense activation gradient 2mn (W0 is frozen: no weight gradient), and for an
approximate layer 2n(k + r0 + r) + 2(m − k)r0 instead. Activation checkpointing runs
the forward twice. The ratio dense/CE-LoRA is the ceiling on the end-to-end speed-up
of any dX-only method; benchmarks print their measured ratio next to it.

:func:`step_flops` predicts the whole step instead: it adds the work both methods pay
alike (attention, the LoRA adapters' GEMMs, the LM head's forward) to the same counts,
from a model's dimensions alone (:class:`ModelShape`), so it runs for 70B shapes too.

On a quantized base (CE-QLoRA) the backward also dequantizes the frozen weight, a
memory-bound cost the FLOP counts leave out: :func:`dequant_cost` per layer (QLoRA all m·n
weights, CE-QLoRA's approximate layers k·n) and :func:`step_dequant` per step.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import AUTO, CELoRAConfig, num_kept


@dataclass
class Ceiling:
    dense_flops: float      # per token, base linears (+ head when included)
    celora_flops: float
    @property
    def ratio(self) -> float:
        """Best possible speed-up: dense / CE-LoRA FLOPs."""
        return self.dense_flops / self.celora_flops


def layer_flops(m: int, n: int, keep: float | None, r0: int, r: int) -> tuple[float, float]:
    """(forward, dX) FLOPs per token of one linear; keep None or 1 means exact dX."""
    fwd = 2.0 * m * n
    if keep is None or keep == 1.0:
        return fwd, 2.0 * m * n
    k = num_kept(keep, m)
    return fwd, 2.0 * n * (k + r0 + r) + 2.0 * (m - k) * r0


def flop_ceiling(model: nn.Module, cfg: CELoRAConfig, checkpointing: bool = False,
                 include_head: bool = False, auto_keep: float = 0.6) -> Ceiling:
    """Dense-LoRA vs CE-LoRA base-linear FLOPs for ``model``'s targeted linears.

    Works on a plain model (before injection). ``auto_keep`` stands in for layers whose
    keep is "auto" (their k is only known at run time). With ``include_head`` the LM head
    counts too, at ``cfg.head_keep`` (exact when None).
    """
    fwd_passes = 2.0 if checkpointing else 1.0
    dense = celora = 0.0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        keep = cfg.keep_for(name)
        if keep is None:
            continue
        keep = auto_keep if keep == AUTO else keep
        m, n = module.out_features, module.in_features
        fwd, dx = layer_flops(m, n, keep, cfg.r0, cfg.r)
        dense += fwd_passes * fwd + 2.0 * m * n
        celora += fwd_passes * fwd + dx
    if include_head:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:
            V, d = head.weight.shape
            fwd = 2.0 * V * d
            dense += fwd_passes * fwd + fwd
            k = V if cfg.head_keep is None else num_kept(cfg.head_keep, V)
            celora += fwd_passes * fwd + 2.0 * k * d
    return Ceiling(dense, celora)


# -- whole-step prediction ---------------------------------------------------------------
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a LLaMA-family decoder that the FLOP count needs (no weights).

    ``ModelShape.of`` reads them from a transformers ``LlamaConfig``-like object, a model
    with such a ``.config``, or returns a ModelShape as is.
    """

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None  # None: hidden // heads

    @property
    def attn_dim(self) -> int:
        """heads · head_dim: the width of Q (and of the attention output)."""
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def projections(self) -> list[tuple[str, int, int]]:
        """(name, m = out features, n = in features) of one decoder layer's seven linears."""
        h, i, q, kv = self.hidden, self.intermediate, self.attn_dim, self.kv_dim
        return [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q),
                ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]

    @classmethod
    def of(cls, obj) -> "ModelShape":
        if isinstance(obj, cls):
            return obj
        cfg = getattr(obj, "config", obj)
        return cls(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, layers=cfg.num_hidden_layers,
                   heads=cfg.num_attention_heads,
                   kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                   vocab=cfg.vocab_size, head_dim=getattr(cfg, "head_dim", None))


# Published shapes (hidden, intermediate, layers, heads, kv heads, vocab).
MODEL_SHAPES = {
    "smollm2-135m": ModelShape(576, 1536, 30, 9, 3, 49152),
    "llama-3.2-1b": ModelShape(2048, 8192, 16, 32, 8, 128256),
    "llama-3-8b": ModelShape(4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": ModelShape(8192, 28672, 80, 64, 8, 128256),
}


@dataclass
class StepFlops:
    """FLOPs per token of one training step (forward + backward, optimizer excluded).

    Shared by dense-dX LoRA and CE-LoRA: ``frozen_fwd`` (the decoder's base linears,
    each forward pass), ``attention`` (QKᵀ and AV, forward and backward), ``lora`` (the
    adapters' forward and backward GEMMs, the (G B) A term of dX included), ``head_fwd``.
    Different: ``dx_*`` (the base linears' G @ W0) and ``head_dx_*`` (the LM head's G @ W).
    ``shrinkable``: the dense FLOPs of the work CE-LoRA approximates (the approximate
    layers' G @ W0, plus the head's when it is vocab-sparse).
    """

    seq_len: int
    checkpointing: bool
    frozen_fwd: float
    attention: float
    lora: float
    head_fwd: float
    dx_dense: float
    dx_celora: float
    head_dx_dense: float
    head_dx_celora: float
    shrinkable: float

    @property
    def shared(self) -> float:
        return self.frozen_fwd + self.attention + self.lora + self.head_fwd

    @property
    def dense(self) -> float:
        return self.shared + self.dx_dense + self.head_dx_dense

    @property
    def celora(self) -> float:
        return self.shared + self.dx_celora + self.head_dx_celora

    @property
    def ratio(self) -> float:
        """Predicted end-to-end step speed-up of CE-LoRA over dense-dX LoRA."""
        return self.dense / self.celora

    @property
    def linear_ratio(self) -> float:
        """The same count restricted to the frozen linears and the head (attention and
        adapters left out): the linear-only ceiling that ``ratio`` cannot exceed."""
        fixed = self.frozen_fwd + self.head_fwd
        return (fixed + self.dx_dense + self.head_dx_dense) / (fixed + self.dx_celora + self.head_dx_celora)

    @property
    def shrinkable_share(self) -> float:
        """Share of the dense step's FLOPs that CE-LoRA's approximations apply to."""
        return self.shrinkable / self.dense


def step_flops(model_or_shape, cfg: CELoRAConfig, seq_len: int, checkpointing: bool = False,
               auto_keep: float = 0.6, causal: bool = True) -> StepFlops:
    """Predicted per-token FLOPs of a LoRA training step, dense dX vs CE-LoRA (docs/design.md §3).

    Pure arithmetic from the dimensions (``ModelShape.of(model_or_shape)``: a ModelShape,
    a ``LlamaConfig``-like config or a model with one), so 70B shapes need no weights.
    Conventions (GEMMs only; norms, softmax, RoPE, the loss and the sparse head's O(V)
    score pass are not counted):

    * a linear's forward is 2mn per token, once, or twice with ``checkpointing`` (per
      decoder layer, as transformers does: the embedding and LM head run once);
    * dense dX is 2mn; an approximate layer's is 2n(k + r0) + 2(m − k)r0 (``layer_flops``
      without the LoRA term, which both methods pay and ``lora`` counts);
    * LoRA at rank ``cfg.r`` on every targeted linear, for both methods: forward
      2r(m + n) per pass, backward 4r(m + n) (G B, dB, dA and (G B) A);
    * attention per layer: forward 4·T·heads·head_dim per token (QKᵀ and AV, each
      2·T·heads·head_dim), halved when ``causal`` (masked blocks skipped, as flash
      kernels do); backward twice the forward (dQ, dK, dV, dP; a FlashAttention-2
      backward's recomputation of QKᵀ is not counted); recomputed under checkpointing;
    * LM head (frozen): forward 2Vd, dX 2Vd or 2kd with ``cfg.head_keep``, no dW.

    ``auto_keep`` stands in for "auto" keeps, as in :func:`flop_ceiling`.
    """
    shape = ModelShape.of(model_or_shape)
    passes = 2.0 if checkpointing else 1.0
    frozen_fwd = lora = dx_dense = dx_celora = shrinkable = 0.0
    for name, m, n in shape.projections():
        keep = cfg.keep_for(name)
        frozen_fwd += passes * 2.0 * m * n
        dx_dense += 2.0 * m * n
        if keep is None:  # not targeted: no adapter, dX exact for both
            dx_celora += 2.0 * m * n
            continue
        keep = auto_keep if keep == AUTO else keep
        lora += (passes * 2.0 + 4.0) * cfg.r * (m + n)
        if keep == 1.0:
            dx_celora += 2.0 * m * n
        else:
            dx_celora += layer_flops(m, n, keep, cfg.r0, cfg.r)[1] - 2.0 * n * cfg.r
            shrinkable += 2.0 * m * n
    L = shape.layers
    attn_fwd = 4.0 * seq_len * shape.attn_dim * (0.5 if causal else 1.0)
    V, d = shape.vocab, shape.hidden
    head_dx_dense = 2.0 * V * d
    head_dx_celora = head_dx_dense if cfg.head_keep is None else 2.0 * num_kept(cfg.head_keep, V) * d
    return StepFlops(
        seq_len=seq_len, checkpointing=checkpointing,
        frozen_fwd=L * frozen_fwd, attention=L * (passes + 2.0) * attn_fwd, lora=L * lora,
        head_fwd=2.0 * V * d, dx_dense=L * dx_dense, dx_celora=L * dx_celora,
        head_dx_dense=head_dx_dense, head_dx_celora=head_dx_celora,
        shrinkable=L * shrinkable + (head_dx_dense if cfg.head_keep is not None else 0.0))


# -- dequantization of a quantized base (CE-QLoRA) ----------------------------------------
@dataclass(frozen=True)
class DequantCost:
    """What dequantizing ``rows`` of an (m, n) bitsandbytes weight reads and writes.

    ``elements``: dense weights written (k·n or m·n). ``bytes_read``: the stored codes of those
    rows plus their scales. 4-bit (NF4/FP4): n/2 bytes of codes per row and one fp32 absmax per
    ``blocksize`` weights; with double quantization the absmax is itself stored as uint8 codes
    with one fp32 scale per 256 of them, and both QLoRA and CE-QLoRA dequantize that whole
    (m·n/blocksize bytes + 4 per 256), then read the fp32 absmax of their rows
    (``quant/bnb.py:_absmax``; the intermediate fp32 absmax write is not counted). LLM.int8
    (``bits=8``): n bytes and one fp32 scale per row. The 256-entry code tables are not counted.
    """

    elements: float
    bytes_read: float


def dequant_cost(m: int, n: int, keep: float | None, bits: int = 4, blocksize: int = 64,
                 double_quant: bool = True) -> DequantCost:
    """One dequantization of a quantized linear's weight for its dX: every row for keep None or
    1.0 (QLoRA, exact layers, refresh steps), the k = ceil(keep·m) kept rows otherwise."""
    rows = m if keep is None or keep == 1.0 else num_kept(keep, m)
    if bits == 8:
        return DequantCost(float(rows * n), float(rows * n + 4 * rows))
    if bits != 4:
        raise ValueError(f"bits must be 4 (NF4/FP4) or 8 (LLM.int8), got {bits!r}")
    codes = rows * n / 2
    scales = 4.0 * rows * n / blocksize
    if double_quant:
        scales += m * n / blocksize + 4.0 * m * n / (blocksize * 256)
    return DequantCost(float(rows * n), codes + scales)


def dequant_elements(m: int, n: int, keep: float | None) -> float:
    """Dense weights one backward of a quantized (m, n) linear dequantizes: m·n (QLoRA, exact),
    k·n (CE-QLoRA's approximate layer between refreshes)."""
    return dequant_cost(m, n, keep).elements


@dataclass
class StepDequant:
    """Dequantization per training step (not per token: a weight is dequantized once per pass,
    whatever the batch) of a decoder whose seven projections are stored quantized.

    ``forward``: the forward passes, alike for both (bitsandbytes 0.50's 4-bit product is
    dequantize + GEMM past a few tokens, or a fused kernel reading every code). ``backward_*``:
    the dX of every projection — QLoRA all m rows, CE-QLoRA k rows on its approximate layers.
    Embeddings and the LM head stay dense.
    """

    forward: float
    backward_qlora: float
    backward_celora: float
    bytes_forward: float
    bytes_qlora: float
    bytes_celora: float

    @property
    def qlora(self) -> float:
        return self.forward + self.backward_qlora

    @property
    def celora(self) -> float:
        return self.forward + self.backward_celora

    @property
    def ratio(self) -> float:
        """Elements dequantized per step, QLoRA / CE-QLoRA."""
        return self.qlora / self.celora

    @property
    def backward_ratio(self) -> float:
        return self.backward_qlora / self.backward_celora


def step_dequant(model_or_shape, cfg: CELoRAConfig, checkpointing: bool = False, auto_keep: float = 0.6,
                 refresh: bool = False, bits: int = 4, blocksize: int = 64, double_quant: bool = True
                 ) -> StepDequant:
    """Elements (and bytes read) dequantized in one step, PEFT QLoRA vs CE-QLoRA with ``cfg``.

    Every projection is quantized (as ``load_in_4bit`` stores them), targeted or not: a layer
    ``cfg`` leaves untargeted or exact dequantizes all m rows in backward, an approximate one k
    rows, and on a ``refresh`` step m + k (the exact dX, and the estimate of the indices in use
    whose error the step measures: ``layer.local_backward``; the very first step has no indices
    yet and dequantizes m). Forward passes: 1, or 2 with checkpointing. ``auto_keep`` stands in
    for "auto" keeps, as in :func:`step_flops`.
    """
    shape = ModelShape.of(model_or_shape)
    passes = 2.0 if checkpointing else 1.0
    fwd = bq = bc = fwd_bytes = bytes_q = bytes_c = 0.0
    for name, m, n in shape.projections():
        keep = cfg.keep_for(name)
        keep = auto_keep if keep == AUTO else keep
        full = dequant_cost(m, n, None, bits, blocksize, double_quant)
        part = dequant_cost(m, n, keep, bits, blocksize, double_quant)
        fwd += passes * full.elements
        fwd_bytes += passes * full.bytes_read
        bq += full.elements
        bytes_q += full.bytes_read
        approximate = part.elements < full.elements
        bc += part.elements + (full.elements if refresh and approximate else 0.0)
        bytes_c += part.bytes_read + (full.bytes_read if refresh and approximate else 0.0)
    L = shape.layers
    return StepDequant(L * fwd, L * bq, L * bc, L * fwd_bytes, L * bytes_q, L * bytes_c)
