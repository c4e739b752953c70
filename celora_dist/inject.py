"""Model surgery: replace the targeted nn.Linear modules of a causal LM by CELoRALinear.

Works on any module tree; the default targets are the LLaMA-family projection names
(q/k/v/o_proj, gate/up/down_proj) shared by LLaMA, Qwen2, Mistral and Gemma.
"""
from __future__ import annotations

import os

from torch import nn

from .config import CELoRAConfig
from .factor_plan import plan_factors
from .factors import check_r0
from .head import sparsify_lm_head
from .layer import CELoRALinear, needs_factors


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def inject_celora(model: nn.Module, cfg: CELoRAConfig, verbose: bool = True, distribute: bool = True,
                  group=None, factor_cache: str | os.PathLike | None = None) -> nn.Module:
    """Convert the target linears of ``model`` in place and freeze everything else.

    The approximate layers' SVD splits are shared out over the ranks of ``group`` (the
    world by default) when torch.distributed is initialised — then every rank of the group
    must call this with the same model — and each is read from / written to
    ``factor_cache`` (a folder) when given; see ``celora_dist/factor_plan.py``.
    ``distribute=False`` factorises every layer in this process.

    Raises ValueError if a target name matches no nn.Linear of the model, listing the
    model's linear module names. Sets ``model.celora_config`` and
    ``model.celora_summary`` (counts of exact/approximate layers, trainable params,
    SVDs computed by this rank, cache hits).
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
    linears = {n: model.get_submodule(n) for n in targets}
    approximate = [(n, linears[n]) for n in targets if needs_factors(cfg.keep_for(n), linears[n].out_features)]
    for name, linear in approximate:  # before any SVD: a bad r0 costs nothing
        check_r0(cfg.r0, linear.out_features, linear.in_features, name)
    factors, counts = plan_factors(approximate, cfg.r0, group, factor_cache, verbose, local=not distribute,
                                   svd=cfg.svd_method)
    n_exact = n_approx = 0
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = CELoRALinear(getattr(parent, child), **cfg.layer_kwargs(name), factors=factors.get(name))
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
        "svd_computed": counts["computed"], "svd_cached": counts["cached"], "svd_ranks": counts["ranks"],
    }
    if verbose:
        print(
            f"CE-LoRA: converted {n_exact + n_approx} linear layers ({n_exact} exact, "
            f"{n_approx} approximate); trainable params {trainable:,} of {total:,} "
            f"({100.0 * trainable / max(total, 1):.2f}%)"
            + (f"; LM head backward keeps {cfg.head_keep:.0%} of vocabulary rows" if cfg.head_keep else "")
            + (f"; SVD splits: {counts['computed']} computed by this rank, {counts['cached']} from the cache"
               + (f", the rest by the other {counts['ranks'] - 1} rank(s)" if counts["ranks"] > 1 else "")
               if n_approx else "")
        )
    return model
