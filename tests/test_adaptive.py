"""keep="auto": k chosen per refresh from the exact G to meet an error budget."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from celora_dist import CELoRAConfig, on_optimizer_step, telemetry
from celora_dist.selection import choose_k

from .test_layer import make_layer, run_backward
from .train_utils import free_port


def test_choose_k_matches_brute_force_tail_estimate():
    g = torch.Generator().manual_seed(0)
    score_sq = torch.rand(50, generator=g) ** 4
    ref_sq = float(score_sq.sum()) * 3
    for budget in (0.01, 0.1, 0.3, 0.5):
        for calibration in (0.7, 1.0, 2.0):
            ordered = sorted(score_sq.tolist(), reverse=True)
            expected = next(k for k in range(1, 51)
                            if calibration * math.sqrt(sum(ordered[k:]) / ref_sq) <= budget)
            assert choose_k(score_sq, ref_sq, budget, calibration) == expected
    assert choose_k(score_sq, ref_sq, 0.0) == 50


def auto_layer(budget, **kw):
    return make_layer(m=48, n=40, r0=4, keep="auto", error_budget=budget, refresh_every=2, **kw)


def test_zero_budget_selects_everything_and_stays_exact():
    layer = auto_layer(0.0)
    assert not layer.is_exact and layer.B0 is not None
    for step in range(4):
        x, grad = torch.randn(6, 40), torch.randn(6, 48)
        dX, _, _ = run_backward(layer, x, grad)
        with torch.no_grad():
            exact = grad @ layer.base_layer.weight + \
                layer.scaling * (grad @ layer.lora_B.weight) @ layer.lora_A.weight
        torch.testing.assert_close(dX, exact, rtol=1e-5, atol=1e-5)
        on_optimizer_step(layer)
        assert layer.selected is None and layer.k == 48


def test_concentrated_column_energy_picks_exactly_those_columns():
    layer = auto_layer(0.01)
    hot = torch.tensor([3, 7, 8, 20, 41])
    grad = torch.zeros(16, 48)
    grad[:, hot] = torch.randn(16, hot.numel())
    run_backward(layer, torch.randn(16, 40), grad)
    on_optimizer_step(layer)
    assert layer.k == hot.numel()
    assert torch.equal(layer.selected, hot)
    assert telemetry(layer)[""]["k"] == hot.numel()


def test_budget_is_met_on_a_stationary_gradient_distribution():
    """After a few refreshes the measured error of the chosen indices is near the budget."""
    budget = 0.02  # the exact B0 A0 part already carries most of this W0's energy
    layer = auto_layer(budget)
    col_scale = torch.rand(48, generator=torch.Generator().manual_seed(3)) ** 3
    errors, ks = [], []
    for step in range(12):
        g = torch.Generator().manual_seed(100 + step)
        grad = torch.randn(64, 48, generator=g) * col_scale
        run_backward(layer, torch.randn(64, 40, generator=g), grad)
        on_optimizer_step(layer)
        if step % 2 == 0 and step > 0:
            errors.append(telemetry(layer)[""]["rel_error"])
        ks.append(layer.k)
    assert 1 < ks[-1] < 48, ks
    assert all(e <= 1.5 * budget for e in errors[2:]), errors
    looser = auto_layer(0.1)
    run_backward(looser, torch.randn(64, 40), torch.randn(64, 48) * col_scale)
    on_optimizer_step(looser)
    assert looser.k < ks[0]  # a looser budget keeps fewer features


def test_auto_keep_validation():
    assert CELoRAConfig(keep="auto").keep == {m: "auto" for m in ("v_proj", "o_proj", "up_proj", "down_proj")}
    with pytest.raises(ValueError, match="error_budget"):
        CELoRAConfig(keep="auto", error_budget=1.5)
    with pytest.raises(ValueError, match=r"keep\['v_proj'\]"):
        CELoRAConfig(keep={"v_proj": "sometimes"})
    with pytest.raises(ValueError, match="score='gradient'"):
        auto_layer(0.1, score="static")


# -- two real ranks (gloo): synced scores and error sums give identical k and indices ------

def _rank_main(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    layer = auto_layer(0.05)  # same seed on both ranks: same W0, A, B
    col_scale = torch.rand(48, generator=torch.Generator().manual_seed(5)) ** 3
    for step in range(3):
        g = torch.Generator().manual_seed(1000 * rank + step)  # different data per rank
        grad = torch.randn(32, 48, generator=g) * col_scale
        run_backward(layer, torch.randn(32, 40, generator=g), grad)
        torch.save({"grad": grad, "x_seed": 1000 * rank + step}, f"{out_dir}/grad_{rank}_{step}.pt")
        on_optimizer_step(layer)
        torch.save({"k": layer.k, "selected": layer.selected}, f"{out_dir}/sel_{rank}_{step}.pt")
    dist.destroy_process_group()


def test_two_ranks_agree_and_equal_the_global_batch_choice(tmp_path):
    mp.start_processes(_rank_main, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for step in range(3):
        a, b = (torch.load(tmp_path / f"sel_{r}_{step}.pt") for r in (0, 1))
        assert a["k"] == b["k"]
        assert (a["selected"] is None and b["selected"] is None) or torch.equal(a["selected"], b["selected"])
    # step 0 is the first refresh: the synced choice equals one process seeing both batches
    ref = auto_layer(0.05)
    for r in (0, 1):
        grad = torch.load(tmp_path / f"grad_{r}_0.pt")["grad"]
        g = torch.Generator().manual_seed(1000 * r)
        torch.randn(32, 48, generator=g)  # replay the rank's RNG to get its x
        run_backward(ref, torch.randn(32, 40, generator=g), grad)
    on_optimizer_step(ref)
    first = torch.load(tmp_path / "sel_0_0.pt")
    assert ref.k == first["k"] and 1 < ref.k < 48
    assert torch.equal(ref.selected, first["selected"])
