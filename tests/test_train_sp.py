"""--sequence-parallel N (DeepSpeed's Ulysses) in real processes: 2 CPU ranks (gloo), SP = 2, DP = 1.

The reference is one process on the same global batches (conftest's ``single_celora``: micro-batch
8, 20 steps, ZeRO-2): with SP each of the two ranks holds half of every sequence, so the losses,
the LoRA update and the selected indices must be the one process's. Tolerances: fp32, measured
2026-12-03 at 6e-7 (losses) and 1.4e-6 (adapter, after 20 steps) relative; asserted at 1e-5.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from .test_train_single import _load_train_module, clean_env  # noqa: F401 (a fixture)
from .train_utils import TINY_FLAGS, assert_same_adapter, read_metrics, run_train, show, train_losses

SP2 = ["--sequence-parallel", "2", "--micro-batch", "8", "--refresh-every", "4", "--dump-celora-state"]
REL = 1e-5  # fp32; measured 6e-7 (losses), 1.4e-6 (adapter)


def _selected(out, rank: int) -> dict:
    return torch.load(out / "celora_state" / f"rank{rank}.pt", weights_only=False)


def _adapter(out) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def _assert_close_losses(got: list[float], ref: list[float]) -> None:
    assert len(got) == len(ref)
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    assert worst < REL, (worst, got, ref)


@pytest.fixture(scope="module")
def sp_zero2(assets, tmp_path_factory):
    """SP 2 on 2 ranks, ZeRO-2 (the default config), 20 steps; a checkpoint at step 10."""
    out = tmp_path_factory.mktemp("sp_zero2")
    proc = run_train(["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS, *SP2,
                      "--max-steps", "20", "--save-every", "10", "--output-dir", str(out)], nproc=2)
    assert proc.returncode == 0, show(proc)
    return out, proc


def test_sp2_zero2_equals_one_process_and_resumes(sp_zero2, single_celora, assets, tmp_path):
    out, proc = sp_zero2
    single, _ = single_celora
    assert "(sequence-parallel 2 x DP 1)" in proc.stdout
    # the full sequences' loss and token counts are logged, not one shard's
    _assert_close_losses(train_losses(out), train_losses(single))
    steps = [r for r in read_metrics(out) if "eval" not in r and "loss" in r]
    ref_steps = [r for r in read_metrics(single) if "eval" not in r and "loss" in r]
    assert [r["tokens"] for r in steps] == [r["tokens"] for r in ref_steps]
    # the gradient norm (what --max-grad-norm clips by) is the sequence's: measured 8e-7
    worst = max(abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in zip(steps, ref_steps))
    assert worst < REL, worst
    # the LoRA update: the gradients of the two shards add up to the sequence's (no 2x, no 1/2;
    # AdamW nearly hides a scale, the gradient norm above does not)
    a, ref = _adapter(out), _adapter(single)
    assert a.keys() == ref.keys()
    for key in ref:
        rel = ((a[key] - ref[key]).abs().max() / ref[key].abs().max()).item()
        assert rel < REL, (key, rel)
    # the scores are summed over SP x DP: both shards of a sequence select what the whole sequence selects
    r0, r1, r_ref = _selected(out, 0), _selected(out, 1), _selected(single, 0)
    approx = [n for n in r_ref if r_ref[n]["selected"] is not None]
    assert approx
    for name in approx:
        assert torch.equal(r0[name]["selected"], r_ref[name]["selected"]), name
        assert torch.equal(r1[name]["selected"], r_ref[name]["selected"]), name
    assert {s["step"] for s in r0.values()} == {20}
    # the held-out evaluation runs whole sequences on each rank (Ulysses is off in eval mode)
    final = [r for r in read_metrics(out) if r.get("eval") == "final"][-1]
    ref_final = [r for r in read_metrics(single) if r.get("eval") == "final"][-1]
    assert final["eval_loss"] == pytest.approx(ref_final["eval_loss"], rel=REL)
    # resume with the same SP size at step 10: the straight run's adapter
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step000010", resumed / "checkpoints" / "step000010")
    (resumed / "checkpoints" / "latest").write_text("step000010")
    proc = run_train(["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS, *SP2,
                      "--max-steps", "20", "--no-final-eval", "--resume", str(resumed),
                      "--output-dir", str(resumed)], nproc=2)
    assert proc.returncode == 0, show(proc)
    assert "resumed at step 10" in proc.stdout
    assert_same_adapter(out, resumed)
    _assert_close_losses(train_losses(resumed)[-10:], train_losses(single)[10:])


def test_sp2_zero3_equals_one_process(assets, single_celora, tmp_path):
    """ZeRO-3's reduce-scatter averages over every rank (SP peers too): the backward loss is scaled
    by N there. A wrong scale is a 2x or 1/2 gradient, which AdamW's update nearly hides (it is
    scale-free up to eps): the gradient norm shows it. HF's full-logits loss (--loss-chunk 0) here,
    the chunked one in the ZeRO-2 run."""
    single, _ = single_celora
    out = tmp_path / "sp_zero3"
    proc = run_train(["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS, *SP2,
                      "--deepspeed_config", "ds_configs/zero3.json", "--loss-chunk", "0", "--max-steps", "6",
                      "--no-final-eval", "--output-dir", str(out)], nproc=2)
    assert proc.returncode == 0, show(proc)
    # steps 0-5: the updates of steps 0-4 and, after the refresh at step 4, the selected indices
    _assert_close_losses(train_losses(out), train_losses(single)[:6])
    norms = [r["grad_norm"] for r in read_metrics(out) if "eval" not in r and "loss" in r]
    ref_norms = [r["grad_norm"] for r in read_metrics(single) if "eval" not in r and "loss" in r][:6]
    worst = max(abs(a - b) / b for a, b in zip(norms, ref_norms))
    assert len(norms) == 6 and worst < REL, (worst, norms, ref_norms)


def test_bad_sequence_parallel_runs_fail_fast_in_process(assets, tmp_path, clean_env, monkeypatch):
    """One line naming the culprit, before torch.distributed starts or a weight is read."""
    import torch.distributed as dist

    from celora_dist.train.errors import UsageError, exit_report

    eager = tmp_path / "eager-llama"
    shutil.copytree(assets["model"], eager)
    config = json.loads((eager / "config.json").read_text())
    (eager / "config.json").write_text(json.dumps({**config, "attn_implementation": "eager"}))
    ckpt = tmp_path / "ckpt"
    tag = ckpt / "checkpoints" / "step000010"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text("")
    (ckpt / "checkpoints" / "latest").write_text("step000010")
    (tag / "run_info.json").write_text(json.dumps(
        {"world_size": 2, "zero_stage": 2, "dtype": "fp32", "method": "celora", "tp_size": 1, "sp_size": 1,
         "dp_size": 2, "micro_batch": 4, "grad_accum": 1, "global_batch": 8}))
    sp_ckpt = tmp_path / "sp_ckpt"
    shutil.copytree(ckpt, sp_ckpt)
    (sp_ckpt / "checkpoints" / "step000010" / "run_info.json").write_text(json.dumps(
        {"world_size": 4, "zero_stage": 2, "dtype": "fp32", "method": "celora", "tp_size": 1, "sp_size": 2,
         "dp_size": 2, "micro_batch": 4, "grad_accum": 1, "global_batch": 8}))
    sp_config = tmp_path / "sp4.json"
    sp_config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "sequence_parallel_size": 4}))

    base = ["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS, "--max-steps", "2"]
    cases = [  # (WORLD_SIZE, flags, message)
        (1, ["--sequence-parallel", "2"], r"--sequence-parallel 2 does not divide the 1 rank\(s\)"),
        (4, ["--sequence-parallel", "3"], r"--sequence-parallel 3 does not divide the 4 rank\(s\)"),
        (2, ["--sequence-parallel", "2", "--tp", "2", "--deepspeed_config", "ds_configs/zero1.json"],
         r"with tensor parallelism \(TP 2"),
        (2, ["--sequence-parallel", "2", "--packing"], r"with --packing: .* drop --packing$"),
        (2, ["--sequence-parallel", "2", "--seq-len", "63"], r"--seq-len 63 is not divisible by --sequence-parallel 2"),
        (4, ["--sequence-parallel", "2", "--deepspeed_config", str(sp_config)],
         r"--sequence-parallel 2 but .* sets sequence_parallel_size = 4"),
        (2, ["--sequence-parallel", "0"], r"--sequence-parallel must be positive"),
        (2, ["--sequence-parallel", "2", "--quantize", "nf4"], r"--quantize with --sequence-parallel 2 is not supported"),
        (8, ["--sequence-parallel", "8", "--micro-batch", "1"], r"its 4 attention heads do not split over"),
        (2, ["--sequence-parallel", "2", "--model", str(eager)],
         r"attn_implementation 'eager'; .* loads the model with attn_implementation=\"sdpa\""),
        (2, ["--sequence-parallel", "2", "--micro-batch", "8", "--resume", str(ckpt)],
         r"saved by a different set-up \(sp_size 1 -> 2\); .* --sequence-parallel size$"),
        (2, ["--sequence-parallel", "2", "--micro-batch", "8", "--resume", str(sp_ckpt)],
         r"saved by 2 data-parallel rank\(s\) of sequence-parallel 2, this run has 1; .* same number of ranks \(4\)$"),
    ]
    train = _load_train_module()
    for world, extra, pattern in cases:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
        out = tmp_path / f"out{len(os.listdir(tmp_path))}"
        with pytest.raises(UsageError, match=pattern) as caught:
            train.main(base + extra + ["--output-dir", extra[-1] if "--resume" in extra else str(out)])
        line, status = exit_report(caught.value)
        assert line.startswith("error: ") and "\n" not in line and status == 2, line
        assert not dist.is_initialized()
