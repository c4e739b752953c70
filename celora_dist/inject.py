"""Model surgery: replace the targeted nn.Linear modules of a causal LM by CELoRALinear.

Works on any module tree; the default targets are the LLaMA-family projection names
(q/k/v/o_proj, gate/up/down_proj) shared by LLaMA, Qwen2, Mistral and Gemma.
"""
from __future__ import annotations

import sys

from torch import nn
from tqdm.auto import tqdm

from .config import CELoRAConfig
from .head import sparsify_lm_head
from .layer import CELoRALinear


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def inject_celora(model: nn.Module, cfg: CELoRAConfig, verbose: bool = True) -> nn.Module:
    """Convert the target linears of ``model`` in place and freeze everything else.

    Raises ValueError if a target name matches no nn.Linear of the model, listing the
    model's linear module names. Sets ``model.celora_config`` and
    ``model.celora_summary`` (counts of exact/approximate layers, trainable params).
    """
    if any(isinstance(m, CELoRALinear) for m in model.modules()):
        raise ValueError("inject_celora: the model already has CE-LoRA layers")
    linear_names = _linear_names(model)
    unmatched = [key for key in cfg.target_modules if not any(_matches(n, key) for n in linear_names)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise ValueError(
            f"inject_celora: target module(s) {unmatched} match no nn.Linear in "
            f"{type(model).__name__}; its linear modules are named {leaves}"
        )
    for p in model.parameters():
        p.requires_grad_(False)

    targets = [n for n in linear_names if cfg.keep_for(n) is not None]
    n_exact = n_approx = 0
    bar = tqdm(targets, desc="CE-LoRA: SVD of frozen weights", unit="layer", file=sys.stderr,
               disable=not verbose or len(targets) < 8, leave=False)
    for name in bar:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = CELoRALinear(getattr(parent, child), **cfg.layer_kwargs(name))
        setattr(parent, child, layer)
        n_exact += layer.is_exact
        n_approx += not layer.is_exact

    if cfg.head_keep is not None:
        sparsify_lm_head(model, cfg.head_keep, measure_every=cfg.refresh_every)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    model.celora_config = cfg
    model.celora_summary = {
        "exact_layers": n_exact, "approx_layers": n_approx,
        "trainable_params": trainable, "total_params": total,
    }
    if verbose:
        print(
            f"CE-LoRA: converted {n_exact + n_approx} linear layers ({n_exact} exact, "
            f"{n_approx} approximate); trainable params {trainable:,} of {total:,} "
            f"({100.0 * trainable / max(total, 1):.2f}%)"
            + (f"; LM head backward keeps {cfg.head_keep:.0%} of vocabulary rows" if cfg.head_keep else "")
        )
    return model
