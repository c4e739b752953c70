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
from .quant.bnb import check_trainable_base, is_quantized
from .quant.layer import CELoRAQuantLinear


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _checked_targets(model: nn.Module, cfg: CELoRAConfig, caller: str) -> dict[str, nn.Linear]:
    """The target linears by name; a target key that matches no nn.Linear is an error naming the model's."""
    if any(isinstance(m, CELoRALinear) for m in model.modules()):
        raise ValueError(f"{caller}: the model already has CE-LoRA layers")
    linear_names = _linear_names(model)
    unmatched = [key for key in cfg.target_modules if not any(_matches(n, key) for n in linear_names)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise ValueError(
            f"{caller}: target module(s) {unmatched} match no nn.Linear in "
            f"{type(model).__name__}; its linear modules are named {leaves}"
        )
    targets = {n: model.get_submodule(n) for n in linear_names if cfg.keep_for(n) is not None}
    for name, linear in targets.items():  # before the SVD plan reads the storage (CELoRAQuantLinear checks too late)
        check_trainable_base(linear, name)
    return targets


def _split_factors(linears: dict[str, nn.Linear], cfg: CELoRAConfig, group, factor_cache, verbose: bool,
                   distribute: bool) -> tuple[dict, dict]:
    """SVD splits of the approximate targets (planned over the ranks, cached): (factors by name, counts)."""
    approximate = [(n, lin) for n, lin in linears.items() if needs_factors(cfg.keep_for(n), lin.out_features)]
    for name, linear in approximate:  # before any SVD: a bad r0 costs nothing
        check_r0(cfg.r0, linear.out_features, linear.in_features, name)
    return plan_factors(approximate, cfg.r0, group, factor_cache, verbose, local=not distribute,
                        svd=cfg.svd_method)


def _celora_type(linear: nn.Linear) -> type[CELoRALinear]:
    """CE-QLoRA's layer for a bitsandbytes-quantized linear, CE-LoRA's for a dense one."""
    return CELoRAQuantLinear if is_quantized(linear) else CELoRALinear


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject_celora_backward(model: nn.Module, cfg: CELoRAConfig, verbose: bool = True, distribute: bool = True,
                           group=None, factor_cache: str | os.PathLike | None = None) -> list[str]:
    """Give the approximate targets the CE-LoRA backward with no LoRA branch of their own (r = 0).

    For a PEFT LoRA to wrap (``celora_dist/integrations/hf_trainer.py``): each
    approximate target becomes a ``CELoRALinear(r=0)`` that PEFT's ``lora.Linear``
    takes as its base layer; exact targets (keep = 1) stay ``nn.Linear``, so PEFT's
    plain LoRA runs there. Trainability is PEFT's business: nothing is frozen here.
    Returns the converted module names. Collective like :func:`inject_celora`.
    """
    linears = _checked_targets(model, cfg, "inject_celora_backward")
    factors, counts = _split_factors(linears, cfg, group, factor_cache, verbose, distribute)
    for name in factors:
        kwargs = {**cfg.layer_kwargs(name), "r": 0}
        _replace(model, name, _celora_type(linears[name])(linears[name], **kwargs, factors=factors[name]))
    if cfg.head_keep is not None:
        sparsify_lm_head(model, cfg.head_keep, measure_every=cfg.refresh_every,
                         tail_correction=cfg.head_tail_correction, dense_warmup=cfg.dense_warmup)
    if verbose:
        print(f"CE-LoRA: {len(factors)} of {len(linears)} target linears get the approximate backward; "
              f"SVD splits: {counts['computed']} computed by this rank, {counts['cached']} from the cache")
    return sorted(factors)


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
    linears = _checked_targets(model, cfg, "inject_celora")
    for p in model.parameters():
        p.requires_grad_(False)
    factors, counts = _split_factors(linears, cfg, group, factor_cache, verbose, distribute)
    n_exact = n_approx = 0
    for name, linear in linears.items():
        layer = _celora_type(linear)(linear, **cfg.layer_kwargs(name), factors=factors.get(name))
        _replace(model, name, layer)
        n_exact += layer.is_exact
        n_approx += not layer.is_exact

    if cfg.head_keep is not None:
        sparsify_lm_head(model, cfg.head_keep, measure_every=cfg.refresh_every,
                         tail_correction=cfg.head_tail_correction, dense_warmup=cfg.dense_warmup)

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
