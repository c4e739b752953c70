"""CELoRAQuantLinear: CE-LoRA over a bitsandbytes-quantized frozen weight (CE-QLoRA).

The forward is QLoRA's: bitsandbytes' own product of the quantized W0 (its compute dtype
honoured) plus the LoRA branch. The backward is CE-LoRA's (``celora_dist/layer.py``, the same
autograd Function) with one change of operand: the frozen rows the dX op reads are dequantized
on the spot,

    dX = G[:, I] · deq(W0[I]) + (G B0_Ī) A0 + s·(G B) A,

so an approximate step dequantizes k of m rows (``quant/bnb.py:dequantize_rows``) where
QLoRA's backward dequantizes all m; exact layers (keep = 1) and refresh steps dequantize the
whole weight, as QLoRA does. dA, dB are exact. The SVD split is taken once from the
dequantized weight and cached under the quantized bytes' digest; no full-precision copy of W0
outlives start-up. The dX backend is always the torch op on the dequantized rows: the exact
alternative would dequantize all m rows besides the larger GEMM, so the measured choice of
``kernels/choice.py`` has nothing to win here, and the Triton kernel reads a dense W0.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..factors import double_lora_factors, seed_of
from ..kernels import grad_input
from ..layer import CELoRALinear
from ..precision import cast
from . import bnb as Q


class CELoRAQuantLinear(CELoRALinear):
    """CE-LoRA replacement of a bitsandbytes ``Linear4bit`` (NF4/FP4) or ``Linear8bitLt``.

    Same attributes and schedule as :class:`CELoRALinear`; ``base_layer`` is the bitsandbytes
    module itself (so a PEFT adapter's keys and ``PeftModel.from_pretrained`` on the same
    quantized base are unchanged). The LoRA branch is fp32, as PEFT's QLoRA creates it (autocast
    or DeepSpeed's bf16 decide the compute dtype); B0/A0 are in the dequantized dtype.
    """

    def __init__(self, base_layer: nn.Linear, *args: Any, **kwargs: Any) -> None:
        Q.check_trainable_base(base_layer, kwargs.get("name", ""))
        if not Q.is_quantized(base_layer):
            raise TypeError(f"CELoRAQuantLinear wraps a bitsandbytes-quantized linear, got "
                            f"{type(base_layer).__name__} at {kwargs.get('name', '')!r}")
        super().__init__(base_layer, *args, **kwargs)
        self.quant_type = Q.quant_type(base_layer)

    def _adapter_factory(self, weight: Tensor) -> dict[str, Any]:
        return {"device": weight.device, "dtype": torch.float32}

    def _own_factors(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return quantized_factors(self.base_layer, self.r0, self.options.svd)

    def _frozen_product(self, xc: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        # bitsandbytes' product under the ambient autocast, as its own layer runs (quant/bnb.py)
        return cast(Q.frozen_product(self.base_layer, xc), xc.dtype)

    def _frozen_dx(self, G: Tensor, weight: Tensor, selected: Tensor | None, left: Tensor | None,
                   right: Tensor | None, backend: str | None = None) -> Tensor:
        if selected is None:
            return grad_input(G, Q.dequantize(self.base_layer, G.dtype), None, left, right)
        rows = Q.dequantize_rows(self.base_layer, selected, G.dtype, self.name)
        return grad_input(G.index_select(1, selected), rows, None, left, right)

    def _dx_backend(self, *args: Any, **kwargs: Any) -> str:
        return "torch"  # see the module docstring: nothing to measure

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear of the dequantized W0 plus s·B A, in the dequantized dtype (the weights
        the adapter was trained against; re-quantize it with bitsandbytes if a 4-bit model is wanted)."""
        if not self.r:
            raise ValueError(f"{self.name or 'layer'} has no LoRA branch (r=0); merge through the PEFT model around it")
        base = self.base_layer
        dense = Q.dequantize(base, torch.float32)
        dtype = Q.dense_dtype(base)
        merged = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                           device=dense.device, dtype=dtype)
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        merged.weight.copy_((dense + delta).to(dtype))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        return merged

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={self.quant_type}"


def quantized_factors(module: nn.Module, r0: int, svd, seed: int | None = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """The double-LoRA split of a quantized layer's dequantized weight, seeded by its storage digest
    (the dense copy lives only for the duration of the SVD)."""
    dense = Q.dequantize(module, torch.float32)
    if seed is None and svd.method != "exact":
        seed = seed_of(Q.quant_digest(module))
    return double_lora_factors(dense, r0, Q.dense_dtype(module), svd=svd, seed=seed)
