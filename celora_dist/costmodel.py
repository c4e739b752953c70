"""FLOP cost model of docs/design.md §3: what "fast" can mean for a config and a model.

Counts the base-linear work per token, the part CE-LoRA changes: forward 2mn per
linear, dense activation gradient 2mn (W0 is frozen: no weight gradient), and for an
approximate layer 2n(k + r0 + r) + 2(m − k)r0 instead. Activation checkpointing runs
the forward twice. The ratio dense/CE-LoRA is the ceiling on the end-to-end speed-up
of any dX-only method; benchmarks print their measured ratio next to it.
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
