"""Start-up factorisation of many layers: split over the ranks, cached on disk.

Every approximate layer needs the SVD split of its W0 (``factors.double_lora_factors``),
which dominates start-up (seconds to minutes per matrix on CPU, docs/design.md §1). With
torch.distributed running, each layer is factorised by ONE rank (:func:`owners`: cost-balanced) and its small
results (B0, A0, ‖Ws[i, :]‖²) are broadcast, so every rank holds the owner's factors,
bit for bit, and the world does each SVD once. With a cache folder the owner first looks
the layer up by a fingerprint of the weight's bytes, its shape, dtype, r0 and the SVD
method with its parameters: a hit is reused (bit-identical, so a resumed run continues
exactly), anything else is a miss and is recomputed and stored — a changed weight, r0,
dtype or method never reuses stale factors (an exact split is never served to a
randomized run, nor the reverse).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import EXACT, SVDMethod
from .factors import double_lora_factors, seed_of, weight_digest
from .quant import bnb as Q
from .quant.layer import quantized_factors
from .zero import gathered, is_partitioned


def user_cache_dir() -> Path:
    """celora_dist's cache root: $CELORA_CACHE, else ~/.cache/celora_dist (factors live in its factors/)."""
    return Path(os.environ.get("CELORA_CACHE", Path.home() / ".cache" / "celora_dist"))

CACHE_VERSION = 2  # bump when the factorisation's output changes (2: exact SVD of wide W0 via W0ᵀ)


def fingerprint(weight: Tensor, r0: int, svd: SVDMethod = EXACT, digest: str | None = None) -> str:
    """A cache key: blake2b of the weight's bytes plus its shape, dtype, r0, the SVD method
    (with oversample/niter when randomized) and the format version."""
    digest = digest or weight_digest(weight)
    dtype = str(weight.dtype).removeprefix("torch.")
    return f"{digest}-{'x'.join(map(str, weight.shape))}-{dtype}-r0_{r0}-{svd.key}-v{CACHE_VERSION}"


def _load(path: Path) -> tuple[Tensor, Tensor, Tensor] | None:
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
        return t["B0"], t["A0"], t["ws_row_sq"]
    except Exception:  # noqa: BLE001 — truncated, corrupt (SafetensorError) or foreign: recompute, overwrite
        return None


def _store(path: Path, B0: Tensor, A0: Tensor, ws_row_sq: Tensor) -> None:
    """Write atomically (temp file + rename): a concurrent or interrupted writer never leaves half a file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({"B0": B0.contiguous().cpu(), "A0": A0.contiguous().cpu(), "ws_row_sq": ws_row_sq.cpu()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cached(path: Path | None, device: torch.device, compute) -> tuple[tuple[Tensor, Tensor, Tensor], bool]:
    """(factors, whether they came from the cache file ``path``); ``compute()`` on a miss, stored."""
    if path is not None and path.is_file():
        hit = _load(path)
        if hit is not None:
            return tuple(t.to(device) for t in hit), True
    result = compute()
    if path is not None:
        _store(path, *result)
    return result, False


def _factorise(weight: Tensor, r0: int, cache: Path | None, svd: SVDMethod
               ) -> tuple[tuple[Tensor, Tensor, Tensor], bool]:
    """(factors, whether they came from the cache) for one weight. The weight is hashed at
    most once: the digest is both the cache key and the randomized SVD's seed."""
    digest = weight_digest(weight) if cache is not None or svd.method != "exact" else None
    path = cache / f"{fingerprint(weight, r0, svd, digest)}.safetensors" if cache is not None else None
    return _cached(path, weight.device, lambda: double_lora_factors(
        weight, r0, weight.dtype, svd=svd, seed=seed_of(digest) if digest else None))


def _factorise_quantized(module: nn.Module, r0: int, cache: Path | None, svd: SVDMethod
                         ) -> tuple[tuple[Tensor, Tensor, Tensor], bool]:
    """:func:`_factorise` for a bitsandbytes layer: keyed by its stored bytes, scales and quant format
    (``quant/bnb.py:quant_digest``), split from its dequantized weight."""
    digest = Q.quant_digest(module)
    m, n = Q.shape(module)
    key = f"{digest}-{m}x{n}-{Q.quant_type(module)}-r0_{r0}-{svd.key}-v{CACHE_VERSION}"
    path = cache / f"{key}.safetensors" if cache is not None else None
    return _cached(path, module.weight.device, lambda: quantized_factors(module, r0, svd, seed_of(digest)))


def _factor_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype of a layer's B0/A0: its weight's, or the dequantized one of a quantized layer."""
    return Q.dense_dtype(linear) if Q.is_quantized(linear) else linear.weight.dtype


def _comm_device(weight: Tensor, group: Any) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return weight.device


def owners(shapes: list[tuple[int, int]], world: int) -> list[int]:
    """The rank that factorises each (m, n) weight: largest first to the least-loaded rank, load
    measured as the SVD's m·n·min(m, n). Deterministic, so every rank derives the same plan.

    Round-robin (layer i to rank i mod N) hands a LLaMA block's v, o, up, down cycle to two
    ranks as v + up and o + down: 1.23x apart by this cost (more before wide matrices were
    factorised through their transpose, ``factors.top_singular``)."""
    cost = [m * n * min(m, n) for m, n in shapes]
    load = [0] * world
    owner = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda j: (-cost[j], j)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += cost[i]
    return owner


def plan_factors(layers: list[tuple[str, nn.Linear]], r0: int, group: Any = None,
                 cache_dir: str | os.PathLike | None = None, verbose: bool = True, local: bool = False,
                 svd: SVDMethod = EXACT) -> tuple[dict[str, tuple[Tensor, Tensor, Tensor]], dict[str, int]]:
    """SVD factors for every (name, linear) in ``layers``, each computed (or read from the cache)
    by ONE rank of ``group`` and broadcast; the same list, in the same order, on every rank.

    Returns ({name: (B0, A0, ws_row_sq)}, counts {"computed": this rank's SVDs, "cached": this
    rank's cache hits, "ranks": ranks sharing the work}). ``svd`` chooses the exact or the
    randomized split (``factors.SVDMethod``). Without torch.distributed (or a
    world of one), or with ``local``, this process does them all.
    """
    import torch.distributed as dist

    distributed = (not local and dist.is_available() and dist.is_initialized()
                   and dist.get_world_size(group) > 1)
    world, rank = (dist.get_world_size(group), dist.get_rank(group)) if distributed else (1, 0)
    cache = Path(cache_dir) if cache_dir is not None else None
    owner = owners([(lin.out_features, lin.in_features) for _, lin in layers], world)
    mine: dict[str, Tensor | nn.Module] = {}  # weights, or quantized layers to dequantize
    for i, (name, linear) in enumerate(layers):  # gathers are collective under ZeRO-3: every rank enters
        if Q.is_quantized(linear):  # dequantized one at a time in the loop below (never ZeRO-3 partitioned)
            if owner[i] == rank:
                mine[name] = linear
            continue
        with gathered([linear.weight]):
            if owner[i] == rank:
                w = linear.weight.detach()
                mine[name] = w.clone() if is_partitioned([linear.weight]) else w  # outlive the gather
    counts = {"computed": 0, "cached": 0, "ranks": world}
    out: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    from tqdm.auto import tqdm

    bar = tqdm(mine.items(), desc=f"CE-LoRA: SVD of frozen weights (rank {rank}: {len(mine)} of {len(layers)})",
               unit="layer", file=sys.stderr, disable=not verbose or len(mine) < 8, leave=False)
    for name, w in bar:
        out[name], hit = (_factorise_quantized(w, r0, cache, svd) if isinstance(w, nn.Module)
                          else _factorise(w, r0, cache, svd))
        counts["cached" if hit else "computed"] += 1
    if distributed:
        for i, (name, linear) in enumerate(layers):
            m, n = linear.out_features, linear.in_features
            device = _comm_device(linear.weight, group)
            if owner[i] == rank:
                parts = [t.to(device) for t in out[name]]
            else:
                dtype = _factor_dtype(linear)
                parts = [torch.empty(m, r0, dtype=dtype, device=device), torch.empty(r0, n, dtype=dtype, device=device),
                         torch.empty(m, dtype=torch.float32, device=device)]
            src = dist.get_global_rank(group, owner[i]) if group is not None else owner[i]
            for t in parts:
                if t.numel():  # r0 = 0: empty factors
                    dist.broadcast(t, src=src, group=group)
            out[name] = tuple(t.to(linear.weight.device) for t in parts)
    return out, counts
