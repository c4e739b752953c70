"""``deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/tp2_*.json``: the trainer
with tensor parallelism (TP=2 on 2 ranks, so DP=1), on CPU/gloo.

- TP=2 x ZeRO-1, CE-LoRA (one launch, checkpoint at step 10): loss falls; the data order is the
  single process's (DP=1: the first losses equal the 1-process run's before any approximate
  backward); row-parallel layers hold the identical selection on both TP ranks; the exported
  adapter has full PEFT shapes, loads in peft on one process, its logits equal a reference
  merged by hand from the file, and that reference reproduces the held-out loss the TP model
  logged at the end of training.
- Resume under TP: a run restarted from the step-10 checkpoint ends with the identical adapter
  and the identical losses for steps 10..19.
- TP=2 x ZeRO-2 in exact mode (--method lora): losses and adapter equal the single-process run.
- TP=2 with adaptive keep: the logged chosen k is the full layer's, matching both ranks' selections.
- TP + ZeRO-3 (and other bad TP settings) fail before any work, naming the config.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from .test_train_single import _load_train_module, clean_env  # noqa: F401 (a fixture)
from .train_utils import (TINY_FLAGS, assert_close_factors, assert_losses_match, assert_same_adapter, dumped_factors,
                          one_process_factors, read_metrics, run_train, show, train_losses)

# micro-batch 8 on each rank of one TP pair = the single-process fixtures' batches (DP=1).
TP_RUN = ["--micro-batch", "8", "--max-steps", "20", "--refresh-every", "4", "--save-every", "10",
          "--dump-celora-state", "--deepspeed_config", "ds_configs/tp2_zero1.json"]
ROW_PARALLEL = ("o_proj", "down_proj")


@pytest.fixture(scope="module")
def tp_celora(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2_zero1")
    args = ["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS, *TP_RUN]
    proc = run_train(args + ["--output-dir", str(out)], nproc=2)
    assert proc.returncode == 0, show(proc)
    return out, args, proc


def test_tp2_zero1_trains_and_matches_single_process_data_order(tp_celora, single_celora):
    out, _, proc = tp_celora
    assert "(TP 2 x DP 1)" in proc.stdout, show(proc)
    losses = train_losses(out)
    assert len(losses) == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"loss did not fall: {losses}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tp_size"] == 2 and summary["world_size"] == 2 and summary["zero_stage"] == 1
    # Step 0 is exact everywhere and its indices act from step 1's backward on, so the losses of
    # steps 0 and 1 depend only on the data and exact gradients: equal to one process's.
    # (Later, column-parallel layers keep a per-shard top-k, not the global one: docs/design.md §2.)
    ref = train_losses(single_celora[0])
    assert losses[:2] == pytest.approx(ref[:2], rel=0, abs=1e-5)
    # Row-parallel layers: every TP rank selected the identical I; column layers their own rows.
    r0, r1 = (torch.load(out / "celora_state" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    row = [n for n in r0 if n.endswith(ROW_PARALLEL) and r0[n]["selected"] is not None]
    assert len(row) == 4  # o_proj, down_proj of both blocks are approximate
    assert all(torch.equal(r0[n]["selected"], r1[n]["selected"]) for n in row)
    half = {"v_proj": 16, "up_proj": 48}  # column layers number their own half of the rows
    col = [n for n in r0 if not n.endswith(ROW_PARALLEL) and r0[n]["selected"] is not None]
    assert len(col) == 4
    for n in col:
        for state in (r0, r1):
            assert int(state[n]["selected"].max()) < half[n.rsplit(".", 1)[-1]], n


def _merged_reference(model_dir, adapter_dir):
    """The base model with W += s · B A merged by hand from the adapter files (no peft)."""
    from transformers import AutoModelForCausalLM

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    modules = dict(model.named_modules())
    merged = 0
    with torch.no_grad():
        for key, A in weights.items():
            if not key.endswith("lora_A.weight"):
                continue
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            B = weights[key.replace("lora_A", "lora_B")]
            linear = modules[name]
            assert A.shape == (r, linear.in_features) and B.shape == (linear.out_features, r), name
            linear.weight += scale * (B @ A)
            merged += 1
    assert merged == 14  # 7 targets x 2 blocks: full (gathered) shapes for every layer
    return model


def test_tp_shards_are_one_factorisation_equal_to_a_single_process(assets, tp_celora):
    """Under TP=2 every rank holds its shard of the FULL W0's split (computed once across the
    world, then sharded): column-parallel layers' B0 rows and ‖Ws[i, :]‖² stack into the
    one-process factors and A0 is shared; row-parallel layers share B0 and the (TP-summed)
    ‖Ws[i, :]‖², and their A0 columns stack."""
    out = tp_celora[0]
    ref = one_process_factors(assets["model"])
    a, b = dumped_factors(out, 0), dumped_factors(out, 1)
    assert a.keys() == b.keys() == ref.keys() and len(ref) == 8
    for name, (B0, A0, ws) in ref.items():
        (B0a, A0a, wsa), (B0b, A0b, wsb) = a[name], b[name]
        if name.endswith(ROW_PARALLEL):
            assert torch.equal(B0a, B0b) and torch.equal(wsa, wsb), name
            full = (B0a, torch.cat([A0a, A0b], dim=1), wsa)
        else:
            assert torch.equal(A0a, A0b), name
            full = (torch.cat([B0a, B0b]), A0a, torch.cat([wsa, wsb]))
        assert_close_factors(full, (B0, A0, ws), name)


def test_tp_adapter_loads_in_peft_and_reproduces_the_tp_model(assets, tp_celora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from celora_dist.train.data import collate, read_records, split_records, tokenize
    from celora_dist.train.evaluate import evaluate

    out, _, _ = tp_celora
    adapter = out / "adapter"
    reference = _merged_reference(assets["model"], adapter)
    tok = AutoTokenizer.from_pretrained(assets["model"])
    train_records, held_out = split_records(read_records(assets["mc"], "letter"), 0.1)
    batch = collate(tokenize(train_records[:16], tok, 64).to_list(), tok.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    with torch.no_grad():
        base_logits = base(**batch).logits
        tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
        logits = tuned(**batch).logits
        ref_logits = reference(**batch).logits
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert float((logits - base_logits).abs().max()) > 0.1  # the adapter is not empty
    # The TP model's own forward, logged at the end of training, is the merged model's.
    logged = [r for r in read_metrics(out) if r.get("eval") == "final"][0]
    mine = evaluate(reference, tok, held_out, 64, torch.device("cpu"))
    assert mine["eval_examples"] == logged["eval_examples"] == 48
    assert mine["eval_loss"] == pytest.approx(logged["eval_loss"], rel=1e-5)
    assert mine["accuracy"] == logged["accuracy"]


def test_tp_resume_from_checkpoint_is_identical(tp_celora, tmp_path):
    """Each TP rank restores its own shard and selection: restarting at step 10 changes nothing."""
    straight, args, _ = tp_celora
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step000010", out / "checkpoints" / "step000010")
    (out / "checkpoints" / "latest").write_text("step000010")
    proc = run_train(args + ["--output-dir", str(out), "--resume", str(out)], nproc=2)
    assert proc.returncode == 0, show(proc)
    assert "resumed at step 10" in proc.stdout
    assert_same_adapter(straight, out)
    resumed = [r for r in read_metrics(out) if "eval" not in r]
    assert [r["step"] for r in resumed] == list(range(10, 20))
    assert_losses_match(straight, resumed)
    for rank in (0, 1):
        s, t = (torch.load(d / "celora_state" / f"rank{rank}.pt", weights_only=False) for d in (straight, out))
        assert all(s[n]["step"] == t[n]["step"] == 20 for n in s)
        assert all((s[n]["selected"] is None and t[n]["selected"] is None)
                   or torch.equal(s[n]["selected"], t[n]["selected"]) for n in s)


def test_tp2_zero2_exact_mode_equals_single_process_lora(assets, single_lora, tmp_path):
    """Every layer exact: TP=2 x ZeRO-2 == one process (same batches, since DP=1)."""
    out = tmp_path / "tp2_zero2_lora"
    proc = run_train(["--model", str(assets["model"]), "--data", str(assets["alpaca"]), *TINY_FLAGS,
                      "--method", "lora", "--micro-batch", "8", "--max-steps", "20",
                      "--deepspeed_config", "ds_configs/tp2_zero2.json", "--output-dir", str(out)], nproc=2)
    assert proc.returncode == 0, show(proc)
    assert train_losses(out) == pytest.approx(train_losses(single_lora[0]), rel=0, abs=1e-5)
    a = load_file(single_lora[0] / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")  # gathered from the TP shards
    assert a.keys() == b.keys()
    for key in a:
        assert b[key].shape == a[key].shape, key
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_tp2_adaptive_keep_logs_the_full_layers_choice(assets, tmp_path):
    """--keep auto under TP: k is chosen per full layer. Row layers hold one selection on both
    ranks; a column layer's logged chosen_k is the rows kept by both ranks together, of m."""
    out = tmp_path / "tp2_auto"
    proc = run_train(["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS,
                      "--micro-batch", "8", "--max-steps", "5", "--refresh-every", "4", "--keep", "auto",
                      "--error-budget", "0.3", "--dump-celora-state", "--deepspeed_config",
                      "ds_configs/tp2_zero1.json", "--output-dir", str(out)], nproc=2)
    assert proc.returncode == 0, show(proc)
    assert all(math.isfinite(x) for x in train_losses(out))
    chosen = {r["step"]: r for r in read_metrics(out) if "chosen_k" in r}
    assert sorted(chosen) == [0, 4]  # the refresh steps
    full_m = {"v_proj": 32, "o_proj": 64, "up_proj": 96, "down_proj": 64}
    r0, r1 = (torch.load(out / "celora_state" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    last = chosen[4]
    assert len(last["chosen_k"]) == 8  # v, o, up, down of both blocks
    for name, k in last["chosen_k"].items():
        m = full_m[name.rsplit(".", 1)[-1]]
        assert 1 <= k <= m and last["chosen_keep"][name] == round(k / m, 4), name
        s0, s1 = r0[name]["selected"], r1[name]["selected"]
        if name.endswith(ROW_PARALLEL):
            assert (s0 is None and s1 is None and k == m) or (torch.equal(s0, s1) and len(s0) == k), name
        else:  # each rank holds its own rows of the global choice (None: all m/2 of them)
            assert sum(m // 2 if s is None else len(s) for s in (s0, s1)) == k, name
    assert any(k < full_m[n.rsplit(".", 1)[-1]] for n, k in last["chosen_k"].items())


# ---- bad TP settings fail before any work -------------------------------------------------------

def test_bad_tp_settings_fail_fast_in_process(assets, tmp_path, clean_env):
    """Like the bad-input tests of test_train_single: UsageError before torch.distributed starts."""
    import torch.distributed as dist

    from celora_dist.train.cli import UsageError
    from celora_dist.train.parallel import check_tp_model

    tp_zero3 = tmp_path / "tp2_zero3.json"
    tp_zero3.write_text(json.dumps({"tensor_parallel": {"autotp_size": 2}, "zero_optimization": {"stage": 3}}))
    autotp_key = tmp_path / "tp_extra.json"
    autotp_key.write_text(json.dumps({"tensor_parallel": {"autotp_size": 2, "tp_overlap_comm": True}}))
    base = ["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS, "--max-steps", "2",
            "--output-dir", str(tmp_path / "out")]
    cases = [
        ("TP + ZeRO-3 in the file", ["--deepspeed_config", str(tp_zero3)],
         r"tp2_zero3\.json: tensor parallelism \(tp=2\) cannot be combined with ZeRO stage 3"),
        ("--tp + a ZeRO-3 config", ["--deepspeed_config", "ds_configs/zero3.json", "--tp", "2"],
         r"zero3\.json: tensor parallelism \(tp=2\) cannot be combined with ZeRO stage 3"),
        ("--tp contradicts the file", ["--deepspeed_config", "ds_configs/tp2_zero1.json", "--tp", "4"],
         r"TP size mismatch: --tp 4 but .*tp2_zero1\.json sets tensor_parallel\.autotp_size = 2"),
        ("TP larger than the world", ["--deepspeed_config", "ds_configs/tp2_zero1.json"],
         r"tensor-parallel size 2 .*tp2_zero1\.json.* does not divide the 1 rank\(s\)"),
        ("AutoTP keys the trainer ignores", ["--deepspeed_config", str(autotp_key)],
         r"tensor_parallel key\(s\) \['tp_overlap_comm'\] are not used"),
    ]
    train = _load_train_module()
    for name, extra, pattern in cases:
        with pytest.raises(UsageError, match=pattern):
            train.main(base + extra)
        assert not dist.is_initialized(), name
        assert not (tmp_path / "out").exists(), f"{name}: work started before the error"
    # On 3 ranks, --tp 3 would pass the checks above; the tiny model's 4 heads cannot split 3 ways.
    with pytest.raises(UsageError, match=r"cannot split .*'num_attention_heads': 4.* over tensor-parallel size 3"):
        check_tp_model(assets["model"], 3)
