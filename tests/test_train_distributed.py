"""``deepspeed --num_gpus 2 launch/train.py`` on CPU (gloo), ZeRO-2 and ZeRO-3.

One launch per configuration, shared by several assertions:
- ZeRO-2, index sync off, 20 steps (checkpoint at 10): loss falls, the ranks' indices differ;
  the same run crashed inside the step-20 save, then resumed from step 10, ends with the
  identical adapter and indices (the crash leaves step 10 as the loadable checkpoint).
- ZeRO-3, index sync on: loss falls, both ranks hold identical indices, and they are the
  indices a single process selects from the same global batches (the meaning of the sync);
  losses equal the single-process run's.
- ZeRO-3, CE-LoRA in exact mode (keep = 1 everywhere): losses and adapter equal a
  single-process ``--method lora`` run.
- The embedded default (SmolLM2-135M on PIQA) end to end with 3 steps; prints accuracy.
"""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from .train_utils import (CRASH_AT_SAVE, TINY_FLAGS, assert_close_factors, assert_losses_match, assert_same_adapter,
                          dumped_factors, free_port, one_process_factors, read_metrics, run_train, show, train_losses)

TWO_RANK = ["--micro-batch", "4", "--max-steps", "20", "--refresh-every", "4", "--dump-celora-state"]


def _selected(out, rank: int) -> dict:
    return torch.load(out / "celora_state" / f"rank{rank}.pt", weights_only=False)


def _same_selection(a: dict, b: dict) -> list[str]:
    """Names of approximate layers whose selected indices are identical in a and b."""
    assert a.keys() == b.keys()
    return [n for n in a if a[n]["selected"] is not None and torch.equal(a[n]["selected"], b[n]["selected"])]


def _approx_layers(state: dict) -> list[str]:
    return [n for n in state if state[n]["selected"] is not None]


def _loss_falls(losses):
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"loss did not fall: {losses}"


@pytest.fixture(scope="module")
def zero2_nosync(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("z2_nosync")
    args = ["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS, *TWO_RANK,
            "--no-sync-indices", "--save-every", "10", "--deepspeed_config", "ds_configs/zero2.json"]
    proc = run_train(args + ["--output-dir", str(out)], nproc=2)
    assert proc.returncode == 0, show(proc)
    return out, args


@pytest.fixture(scope="module")
def zero3_sync(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("z3_sync")
    port = free_port()
    proc = run_train(["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS, *TWO_RANK,
                      "--deepspeed_config", "ds_configs/zero3.json", "--output-dir", str(out)], nproc=2,
                     port=port)
    assert proc.returncode == 0, show(proc)
    return out, port


def test_zero2_loss_falls_and_unsynced_indices_differ(assets, zero2_nosync):
    from celora_dist.train.data import read_records, split_records

    out, _ = zero2_nosync
    _loss_falls(train_losses(out))
    # the held-out questions are split over the 2 ranks: counts are summed before the ratios
    final = [r for r in read_metrics(out) if r.get("eval") == "final"][0]
    labels = [r["label"] for r in split_records(read_records(assets["mc"], "letter"), 0.1)[1]]
    assert final["eval_examples"] == len(labels) == 48
    assert final["majority_rate"] == max(labels.count(c) for c in set(labels)) / len(labels)
    r0, r1 = _selected(out, 0), _selected(out, 1)
    approx = _approx_layers(r0)
    assert len(approx) == 8  # v/o/up/down of both blocks
    assert len(_same_selection(r0, r1)) < len(approx), "ranks with different data selected identical indices"


def test_zero2_resume_after_crash_mid_save_is_identical(zero2_nosync, tmp_path):
    straight, args = zero2_nosync
    out = tmp_path / "crashed"
    crashed = run_train(["--crash-at-save", "20", *args, "--output-dir", str(out)], nproc=2, script=CRASH_AT_SAVE)
    assert crashed.returncode != 0, show(crashed)
    ckpt = out / "checkpoints"
    # The step-20 files were written but never committed: 'latest' still names step 10.
    assert (ckpt / "step000020").is_dir() and not (ckpt / "step000020" / "COMPLETE").exists()
    assert (ckpt / "latest").read_text() == "step000010"

    resumed = run_train(args + ["--output-dir", str(out), "--resume", str(out)], nproc=2)
    assert resumed.returncode == 0, show(resumed)
    assert "resumed at step 10" in resumed.stdout
    assert_same_adapter(straight, out)
    # Same data order and same per-rank indices: the losses of steps 10..19 match too.
    resumed_losses = [r for r in read_metrics(out) if "eval" not in r and r["step"] >= 10]
    assert [r["step"] for r in resumed_losses][-10:] == list(range(10, 20))
    assert_losses_match(straight, resumed_losses[-10:])
    for rank in (0, 1):
        s, t = _selected(straight, rank), _selected(out, rank)
        assert len(_same_selection(s, t)) == len(_approx_layers(s))


def test_zero3_synced_indices_identical_and_match_single_process(zero3_sync, single_celora):
    out, _ = zero3_sync
    single, _ = single_celora
    losses = train_losses(out)
    _loss_falls(losses)
    r0, r1 = _selected(out, 0), _selected(out, 1)
    approx = _approx_layers(r0)
    assert approx and len(_same_selection(r0, r1)) == len(approx)
    # Summing squared G column norms over the ranks selects what the global batch selects.
    ref = _selected(single, 0)
    assert len(_same_selection(r0, ref)) == len(approx)
    assert [s["step"] for s in r0.values()] == [20] * len(r0)
    # ZeRO-3 gathers W0/B0/A0/LoRA correctly in forward and backward: same losses as one process.
    assert losses == pytest.approx(train_losses(single), rel=0, abs=1e-4)


@pytest.mark.parametrize("run", ["zero2_nosync", "zero3_sync"])
def test_ranks_train_with_one_factorisation_equal_to_a_single_process(assets, run, request):
    """The SVD split is computed once per layer across the 2 ranks and broadcast
    (celora_dist/factor_plan.py): both ranks hold the same factors bit for bit — under ZeRO-3
    as gathered from their partitions — and they are the factors one process computes alone."""
    out = request.getfixturevalue(run)[0]
    ref = one_process_factors(assets["model"])
    a, b = dumped_factors(out, 0), dumped_factors(out, 1)
    assert a.keys() == b.keys() == ref.keys() and len(ref) == 8
    for name, want in ref.items():
        assert all(torch.equal(x, y) for x, y in zip(a[name], b[name])), name
        assert_close_factors(a[name], want, name)


def test_run_leaves_no_deepspeed_shared_memory_behind(zero3_sync):
    """DeepSpeed's CPU backend never unlinks its 66 MB-per-rank /dev/shm all-reduce segments."""
    _, port = zero3_sync
    left = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*")
    assert not left, f"leaked shared memory: {left}"


def test_zero3_exact_mode_equals_single_process_lora(assets, single_lora, tmp_path):
    """CE-LoRA with keep = 1 everywhere, 2 ranks under ZeRO-3 == --method lora in one process."""
    out = tmp_path / "z3_exact"
    proc = run_train(["--model", str(assets["model"]), "--data", str(assets["alpaca"]), *TINY_FLAGS,
                      "--method", "celora", "--keep", "v_proj=1,o_proj=1,up_proj=1,down_proj=1",
                      "--micro-batch", "4", "--max-steps", "20",
                      "--deepspeed_config", "ds_configs/zero3.json", "--output-dir", str(out)], nproc=2)
    assert proc.returncode == 0, show(proc)
    ref = train_losses(single_lora[0])
    assert train_losses(out) == pytest.approx(ref, rel=0, abs=1e-4)
    a = load_file(single_lora[0] / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")  # gathered from ZeRO-3 partitions
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_embedded_default_end_to_end(tmp_path):
    """The README's main job (SmolLM2-135M-Instruct on PIQA), 3 steps, 16 held-out questions."""
    out = tmp_path / "embedded"
    proc = run_train(["--max-steps", "3", "--eval-samples", "16", "--output-dir", str(out)], nproc=2, timeout=600)
    assert proc.returncode == 0, show(proc)
    assert "held-out accuracy" in proc.stdout, show(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_examples"] == 16 and summary["world_size"] == 2
    assert 0.0 <= summary["accuracy"] <= 1.0 and 0.0 <= summary["zero_shot_accuracy"] <= 1.0
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 1_000_000
