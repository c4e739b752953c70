"""Read a bitsandbytes-quantized frozen weight: whole, by rows, or through its forward product.

CE-LoRA's approximate backward needs only the k kept rows of W0 (docs/design.md §1), so on a
quantized base it dequantizes k of m rows — QLoRA (bitsandbytes' ``MatMul4Bit`` backward)
dequantizes all m on every backward. The row gather relies on the storage layout
(``../shared/RECIPES.md``, verified against bitsandbytes 0.50.2):

- 4-bit (NF4/FP4): the (m, n) weight is flattened row-major and packed two codes per byte
  in blocks of ``blocksize`` elements, one absmax per block. When the block size divides n,
  row i owns bytes [i·n/2, (i+1)·n/2) and absmax blocks [i·n/b, (i+1)·n/b): gathering rows of
  the (m, n/2) byte view and the (m, n/b) absmax view and dequantizing them is
  ``dequantize(W)[I]`` bit for bit. Double quantization quantizes the absmax itself (blocks of
  256 across rows): it is dequantized first, whole (m·n/b values: 1/b of the weight).
- LLM.int8: int8 rows ``CB`` with one fp32 scale per row (``SCB``): row i is CB[i]·SCB[i]/127.

Where the 4-bit block size does not divide n a row's blocks straddle rows; such a layer
dequantizes whole and gathers (correct, without the dequantization saving; warned once).
bitsandbytes is imported only when a quantized layer is met (an optional dependency).
"""
from __future__ import annotations

import hashlib
import warnings

import torch
from torch import Tensor, nn

# bitsandbytes' parameter classes, by name: recognising a quantized layer must not import it
_PARAM_KINDS = {"Params4bit": "4bit", "Int8Params": "int8"}
QUANT_TYPES = ("nf4", "fp4", "int8")


def quant_type(module: nn.Module) -> str | None:
    """"nf4", "fp4" or "int8" for a bitsandbytes-quantized linear, None for anything else."""
    weight = getattr(module, "weight", None)
    kind = _PARAM_KINDS.get(type(weight).__name__)
    if kind == "int8":
        return "int8"
    if kind == "4bit":
        state = weight.quant_state
        return None if state is None else state.quant_type
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes linear whose weight is stored quantized."""
    return quant_type(module) is not None


def shape(module: nn.Module) -> tuple[int, int]:
    """(m, n) = (out_features, in_features) of the dense weight the storage encodes."""
    return module.out_features, module.in_features


def dense_dtype(module: nn.Module) -> torch.dtype:
    """The dtype dequantization returns: the weight's dtype before quantization (4-bit) or fp32
    (LLM.int8: int8 codes times fp32 row scales)."""
    if quant_type(module) == "int8":
        return torch.float32
    return module.weight.quant_state.dtype


def check_trainable_base(module: nn.Module, name: str = "") -> None:
    """Refuse storage CE-LoRA cannot read as a frozen weight (ValueError naming the layer)."""
    where = name or type(module).__name__
    if quant_type(module) == "int8" and (getattr(module.weight, "has_fp16_weights", False)
                                        or module.weight.dtype != torch.int8):
        raise ValueError(f"{where}: LLM.int8 layer with has_fp16_weights=True (its weight trains in 16 bit, "
                         "not a quantized frozen base); load it with has_fp16_weights=False")
    kind = quant_type(module)
    if kind is not None and kind not in QUANT_TYPES:
        raise ValueError(f"{where}: bitsandbytes quant type {kind!r} is not supported (supported: {QUANT_TYPES})")
    if kind in ("nf4", "fp4") and getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        # bitsandbytes 0.50 repacks a Linear4bit on its first eval-mode no-grad forward on an AVX512-BF16
        # CPU: another byte layout, bf16 scales. Every reader here (row gather, dequantize, matmul_4bit
        # on weight.t()) then returns wrong values, and bnb's inverse restores neither (lossy bf16 scales).
        raise ValueError(f"{where}: this 4-bit weight was repacked by bitsandbytes' CPU inference path (an "
                         "eval-mode forward without gradients on an AVX512-BF16 CPU), which CE-QLoRA cannot read; "
                         "load the model afresh and convert it before running it for inference")


def _int8_scales(module: nn.Module) -> Tensor:
    scales = getattr(module.weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(module, "state", None), "SCB", None)
    if scales is None:
        raise ValueError(f"{type(module).__name__}: LLM.int8 weight without row scales (SCB): is it quantized "
                         "(moved to its device) yet?")
    return scales


def _absmax(state) -> Tensor:
    """The 4-bit block scales in fp32, double quantization undone."""
    import bitsandbytes.functional as bF

    if state.nested:
        return bF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax


def rows_gatherable(module: nn.Module) -> bool:
    """Whether a row of the stored weight is a contiguous run of bytes and scales (see module doc)."""
    if quant_type(module) == "int8":
        return True
    m, n = shape(module)
    state = module.weight.quant_state
    # bitsandbytes' own eval forward on AVX512-BF16 CPUs may have repacked the bytes (not row-major then)
    return n % state.blocksize == 0 and not getattr(state, "packing_format_for_cpu", False)


_warned_whole = False


def dequantize(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """The whole dense (m, n) weight, in ``dtype`` (default :func:`dense_dtype`)."""
    import bitsandbytes.functional as bF

    dtype = dtype or dense_dtype(module)
    weight = module.weight
    if quant_type(module) == "int8":
        return bF.int8_vectorwise_dequant(weight.data, _int8_scales(module)).to(dtype)
    return bF.dequantize_4bit(weight.data, weight.quant_state).to(dtype)


def dequantize_rows(module: nn.Module, rows: Tensor, dtype: torch.dtype | None = None, name: str = "") -> Tensor:
    """Rows ``rows`` of the dense weight, (k, n) in ``dtype``, dequantizing only those rows.

    Equal to ``dequantize(module)[rows]`` bit for bit (tests/test_qlora.py)."""
    import bitsandbytes.functional as bF

    dtype = dtype or dense_dtype(module)
    m, n = shape(module)
    weight = module.weight
    if quant_type(module) == "int8":
        return bF.int8_vectorwise_dequant(weight.data.index_select(0, rows),
                                          _int8_scales(module).index_select(0, rows)).to(dtype)
    if not rows_gatherable(module):
        global _warned_whole
        if not _warned_whole:  # once per process, not per layer: the same cause on every block
            _warned_whole = True
            warnings.warn(f"CE-QLoRA: {name or f'a {m}x{n} layer'} (and any like it): 4-bit block size "
                          f"{weight.quant_state.blocksize} does not divide in_features {n}, so its rows cannot be "
                          "dequantized alone; such layers dequantize the whole weight in backward (correct, "
                          "without the saving)", RuntimeWarning, stacklevel=2)
        return dequantize(module, dtype).index_select(0, rows)
    state = weight.quant_state
    packed = weight.data.view(torch.uint8).view(m, n // 2).index_select(0, rows)
    scales = _absmax(state).view(m, n // state.blocksize).index_select(0, rows)
    row_state = bF.QuantState(absmax=scales.reshape(-1), shape=torch.Size((rows.numel(), n)), code=state.code,
                              blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype)
    return bF.dequantize_4bit(packed.reshape(-1, 1), row_state).to(dtype)


def frozen_product(module: nn.Module, x: Tensor) -> Tensor:
    """``x deq(W0)ᵀ + b`` as bitsandbytes' own layer computes it (its compute dtype honoured, the
    ambient autocast applied), in x's dtype.

    4-bit calls ``bnb.matmul_4bit`` rather than the layer's forward: on CPUs with AVX512-BF16
    that forward repacks the stored weight in eval mode (bitsandbytes 0.50
    ``_convert_weight_packed_for_cpu``), which would change the byte layout the row gather reads.
    """
    if quant_type(module) == "int8":
        return module(x)
    import bitsandbytes as bnb

    compute = getattr(module, "compute_dtype", None) or x.dtype
    bias = None if module.bias is None else module.bias.to(compute)
    return bnb.matmul_4bit(x.to(compute), module.weight.t(), bias=bias,
                           quant_state=module.weight.quant_state).to(x.dtype)


def quant_digest(module: nn.Module) -> str:
    """blake2b of the stored bytes, scales and quantization format: the factor cache key and the
    randomized SVD's seed of a quantized layer (equal storage, equal factors, on every rank)."""
    h = hashlib.blake2b(digest_size=20)
    weight = module.weight
    kind = quant_type(module)
    parts = [weight.data]
    if kind == "int8":
        parts.append(_int8_scales(module))
        fmt = "int8"
    else:
        state = weight.quant_state
        parts += [_absmax(state), state.code]
        fmt = f"{kind}-b{state.blocksize}-{state.dtype}"
    h.update(f"{fmt}-{shape(module)}".encode())
    for t in parts:
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())
    return h.hexdigest()
