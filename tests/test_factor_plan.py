"""Start-up factorisation (celora_dist/factor_plan.py): each layer's SVD split done by ONE rank
and broadcast (2 real gloo processes), and the on-disk cache: a hit is bit-identical and
computes nothing, a changed weight / r0 / dtype misses."""
from __future__ import annotations

import torch

from celora_dist import CELoRAConfig, inject_celora
from celora_dist import factor_plan
from celora_dist.config import SVDMethod
from celora_dist.layer import celora_layers

from .conftest import tiny_llama
from .test_tp import WORLD, _spawn

CFG = dict(r=4, alpha=8, r0=4)


def _factors(model) -> dict[str, tuple[torch.Tensor, ...]]:
    return {name: (layer.B0.detach().clone(), layer.A0.detach().clone(), layer.ws_row_sq.clone())
            for name, layer in celora_layers(model) if not layer.is_exact}


def _counting(monkeypatch) -> list[str]:
    """Record every SVD split computed in this process (by the weight's shape)."""
    calls: list[str] = []
    real = factor_plan.double_lora_factors

    def counted(weight, r0, dtype, **kw):
        calls.append(tuple(weight.shape))
        return real(weight, r0, dtype, **kw)

    monkeypatch.setattr(factor_plan, "double_lora_factors", counted)
    return calls


def _split_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from celora_dist import factor_plan as fp

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    calls = []
    real = fp.double_lora_factors
    fp.double_lora_factors = lambda w, r0, dtype, **kw: calls.append(tuple(w.shape)) or real(w, r0, dtype, **kw)
    model = inject_celora(tiny_llama(), CELoRAConfig(**CFG), verbose=False)  # the world shares the SVDs
    torch.save({"factors": _factors(model), "calls": calls, "summary": model.celora_summary},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_each_layer_factorised_once_across_two_ranks(tmp_path, monkeypatch):
    _spawn(_split_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    calls = _counting(monkeypatch)
    single = _factors(inject_celora(tiny_llama(), CELoRAConfig(**CFG), verbose=False))
    assert len(calls) == len(single) == 8  # v/o/up/down of 2 decoder layers
    # every layer exactly once over the world, shared out evenly
    assert sorted(len(r["calls"]) for r in ranks) == [4, 4]
    assert sum(r["summary"]["svd_computed"] for r in ranks) == 8 and ranks[0]["summary"]["svd_ranks"] == 2
    for name, ref in single.items():
        a, b = ranks[0]["factors"][name], ranks[1]["factors"][name]
        assert all(torch.equal(x, y) for x, y in zip(a, b)), name  # one owner's factors, bit for bit
        for got, want in zip(a, ref):  # and a one-process factorisation's, up to LAPACK threading
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cache_hit_is_bit_identical_and_computes_nothing(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    first = inject_celora(tiny_llama(), CELoRAConfig(**CFG), verbose=False, factor_cache=tmp_path)
    assert len(calls) == 8 and len(list(tmp_path.glob("*.safetensors"))) == 8
    assert first.celora_summary["svd_computed"] == 8 and first.celora_summary["svd_cached"] == 0
    calls.clear()
    again = inject_celora(tiny_llama(), CELoRAConfig(**CFG), verbose=False, factor_cache=tmp_path)
    assert calls == [] and again.celora_summary["svd_cached"] == 8
    a, b = _factors(first), _factors(again)
    assert all(torch.equal(x, y) for name in a for x, y in zip(a[name], b[name]))


def test_cache_misses_on_a_changed_weight_r0_or_dtype(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    inject_celora(tiny_llama(), CELoRAConfig(**CFG), verbose=False, factor_cache=tmp_path)
    calls.clear()
    changed = tiny_llama()
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3  # one element of one layer
    inject_celora(changed, CELoRAConfig(**CFG), verbose=False, factor_cache=tmp_path)
    assert calls == [(64, 96)]  # only that layer (down_proj: 64 x 96) is recomputed
    calls.clear()
    inject_celora(tiny_llama(), CELoRAConfig(**dict(CFG, r0=3)), verbose=False, factor_cache=tmp_path)
    assert len(calls) == 8  # another r0: every layer misses
    calls.clear()
    inject_celora(tiny_llama().to(torch.bfloat16), CELoRAConfig(**CFG), verbose=False, factor_cache=tmp_path)
    assert len(calls) == 8  # another dtype: every layer misses


def test_cache_never_serves_one_svd_method_for_another(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    exact_cfg = CELoRAConfig(**CFG, svd="exact")
    exact = _factors(inject_celora(tiny_llama(), exact_cfg, verbose=False, factor_cache=tmp_path))
    calls.clear()
    rand_cfg = CELoRAConfig(**CFG, svd="randomized", svd_oversample=4, svd_niter=1)
    rand = _factors(inject_celora(tiny_llama(), rand_cfg, verbose=False, factor_cache=tmp_path))
    assert len(calls) == 8  # randomized: every layer misses the exact entries
    assert any(not torch.equal(rand[n][0], exact[n][0]) for n in exact)  # and really is another split
    calls.clear()
    again = _factors(inject_celora(tiny_llama(), rand_cfg, verbose=False, factor_cache=tmp_path))
    assert calls == [] and all(torch.equal(x, y) for n in rand for x, y in zip(rand[n], again[n]))
    inject_celora(tiny_llama(), CELoRAConfig(**CFG, svd="randomized", svd_oversample=4, svd_niter=2),
                  verbose=False, factor_cache=tmp_path)
    assert len(calls) == 8  # other power iterations: another key
    calls.clear()
    inject_celora(tiny_llama(), exact_cfg, verbose=False, factor_cache=tmp_path)
    assert calls == []  # the exact entries are still there, untouched
    keys = {p.name.split("-")[-2] for p in tmp_path.glob("*.safetensors")}
    assert keys == {"exact", "rand_p4_q1", "rand_p4_q2"}
    assert factor_plan.fingerprint(torch.ones(3, 2), 1) != factor_plan.fingerprint(
        torch.ones(3, 2), 1, SVDMethod("randomized"))


def test_an_unreadable_cache_file_is_recomputed(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    inject_celora(tiny_llama(), CELoRAConfig(**CFG), verbose=False, factor_cache=tmp_path)
    victim = sorted(tmp_path.glob("*.safetensors"))[0]
    victim.write_bytes(b"truncated")
    calls.clear()
    inject_celora(tiny_llama(), CELoRAConfig(**CFG), verbose=False, factor_cache=tmp_path)
    assert len(calls) == 1 and victim.stat().st_size > 100  # recomputed and rewritten


def test_owners_balance_the_svd_cost_deterministically():
    """LLaMA-3.2-1B blocks (v, o, up, down) at N ranks: every layer has one owner, and the loads
    differ by less than the largest single SVD (round-robin: one rank o + down, 1.23x the other)."""
    from celora_dist.factor_plan import owners

    block = [(512, 2048), (2048, 2048), (8192, 2048), (2048, 8192)]
    shapes = block * 16
    cost = [m * n * min(m, n) for m, n in shapes]
    for world in (1, 2, 3, 8):
        owner = owners(shapes, world)
        assert owner == owners(shapes, world) and set(owner) <= set(range(world))
        loads = [sum(c for c, o in zip(cost, owner) if o == r) for r in range(world)]
        assert max(loads) - min(loads) <= max(cost), (world, loads)
    round_robin = [sum(c for i, c in enumerate(cost) if i % 2 == r) for r in range(2)]
    assert max(round_robin) > 1.2 * min(round_robin)  # what the balanced plan replaces
