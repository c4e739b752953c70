"""launch/train.py as one process (the debug mode): CE-LoRA and LoRA train through the same
DeepSpeed code path, the exported adapter works in PEFT, and bad input fails fast."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from .train_utils import REPO, TINY_FLAGS, read_metrics, run_train, show, train_losses


def _loss_falls(losses: list[float]) -> None:
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"loss did not fall: first five {losses[:5]}, last five {losses[-5:]}"


def test_single_process_celora_loss_falls(single_celora):
    out, proc = single_celora
    losses = train_losses(out)
    assert len(losses) == 20
    _loss_falls(losses)
    records = read_metrics(out)
    for key in ("lr", "grad_norm", "tokens_per_s", "step_time_s", "peak_mem_mb"):
        assert all(key in r for r in records if "eval" not in r), key
    # Refresh steps 4, 8, ... measure the true dX error of the approximate layers.
    errors = [r["grad_rel_error"] for r in records if "grad_rel_error" in r]
    assert [r["step"] for r in records if "grad_rel_error" in r] == [4, 8, 12, 16]
    assert all(0.0 < e < 1.5 for step in errors for e in step.values())
    assert any(name.endswith("v_proj") for name in errors[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "celora" and summary["steps"] == 20 and 0.0 <= summary["accuracy"] <= 1.0
    assert "summary: 20 steps" in proc.stdout


def test_checkpoints_carry_adapters_and_rotate(single_celora):
    """Every checkpoint holds its step's PEFT adapter; --save-total-limit 2 kept the newest two."""
    from safetensors.torch import load_file

    out, proc = single_celora
    ckpts = out / "checkpoints"
    assert sorted(d.name for d in ckpts.glob("step*")) == ["step000015", "step000020"]
    assert (ckpts / "latest").read_text() == "step000020"
    assert "removed checkpoint step000005" in proc.stdout and "removed checkpoint step000010" in proc.stdout
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    at20 = load_file(ckpts / "step000020" / "adapter" / "adapter_model.safetensors")
    at15 = load_file(ckpts / "step000015" / "adapter" / "adapter_model.safetensors")
    assert final.keys() == at20.keys() == at15.keys()
    for key in final:
        torch.testing.assert_close(at20[key], final[key], rtol=0, atol=0)
    assert any(not torch.equal(at15[k], final[k]) for k in final)  # step 15's own weights, not a copy
    assert (ckpts / "step000015" / "adapter" / "adapter_config.json").is_file()


def test_compile_matches_eager_run(assets, single_celora, tmp_path):
    """--compile (aot_eager here: Dynamo + AOTAutograd, no C++ build; the default inductor adds ~1 min
    on this CPU) through DeepSpeed's engine.compile(): the single_celora run's flags without its
    checkpoints, and the same losses, refresh-step errors, final indices and held-out loss."""
    out = tmp_path / "compiled"
    proc = run_train(["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS,
                      "--max-steps", "20", "--refresh-every", "4", "--micro-batch", "8",
                      "--output-dir", str(out), "--dump-celora-state", "--compile", "aot_eager"])
    assert proc.returncode == 0, show(proc)
    assert "compiled (aot_eager)" in proc.stdout
    eager_out = single_celora[0]
    assert train_losses(out) == pytest.approx(train_losses(eager_out), rel=1e-5, abs=1e-6)
    errors = {r["step"]: r["grad_rel_error"] for r in read_metrics(out) if "grad_rel_error" in r}
    want = {r["step"]: r["grad_rel_error"] for r in read_metrics(eager_out) if "grad_rel_error" in r}
    assert errors.keys() == want.keys() == {4, 8, 12, 16}  # the schedule advanced under compile
    for step in want:
        assert errors[step] == pytest.approx(want[step], rel=1e-4), step
    got = torch.load(out / "celora_state" / "rank0.pt", weights_only=False)
    ref = torch.load(eager_out / "celora_state" / "rank0.pt", weights_only=False)
    assert got.keys() == ref.keys() and any(v["selected"] is not None for v in ref.values())
    for name in ref:
        assert got[name]["step"] == ref[name]["step"] == 20
        assert (ref[name]["selected"] is None) == (got[name]["selected"] is None)
        if ref[name]["selected"] is not None:
            assert torch.equal(got[name]["selected"], ref[name]["selected"]), name
    final = json.loads((out / "summary.json").read_text())
    assert final["eval_loss"] == pytest.approx(json.loads((eager_out / "summary.json").read_text())["eval_loss"],
                                               rel=1e-5)


def _tied_copy(model_dir, out):
    """The tiny test model with its LM head tied to the input embedding (as SmolLM2's is)."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def test_chunked_loss_flag_on_and_off_agree(assets, tmp_path):
    """--loss-chunk 4 (several chunks per micro-batch; the vocab-sparse head's scores summed over them) and
    --loss-chunk 0 (HF's full-logits path) train the same: losses, the head's and the layers' measured errors
    and the adapter agree to fp32 rounding. Under ZeRO-3 with a tied head: the chunked loss gathers the
    embedding's partitioned weight itself (the head module never runs)."""
    from safetensors.torch import load_file

    model = _tied_copy(assets["model"], tmp_path / "tied")
    runs = {}
    for chunk in ("0", "4"):
        out = tmp_path / f"chunk{chunk}"
        proc = run_train(["--model", str(model), "--data", str(assets["mc"]), *TINY_FLAGS, "--max-steps", "8",
                          "--refresh-every", "4", "--micro-batch", "8", "--head-keep", "0.3", "--loss-chunk", chunk,
                          "--deepspeed_config", "ds_configs/zero3.json", "--no-final-eval", "--output-dir", str(out)])
        assert proc.returncode == 0, show(proc)
        assert ("LM-head loss: 4 counted tokens per chunk" in proc.stdout) == (chunk == "4")
        runs[chunk] = out
    assert train_losses(runs["4"]) == pytest.approx(train_losses(runs["0"]), rel=1e-5)
    errors = {c: {r["step"]: r["grad_rel_error"] for r in read_metrics(out) if "grad_rel_error" in r}
              for c, out in runs.items()}
    # layers refresh at 0 and 4; the head also measures at 1, 2 (its 0, 1, 2, 4, ... schedule)
    assert errors["4"].keys() == errors["0"].keys() == {0, 1, 2, 4}
    for step, want in errors["0"].items():
        assert "lm_head" in want and errors["4"][step] == pytest.approx(want, rel=1e-4)
    adapter = {c: load_file(out / "adapter" / "adapter_model.safetensors") for c, out in runs.items()}
    for key in adapter["0"]:
        torch.testing.assert_close(adapter["4"][key], adapter["0"][key], rtol=1e-4, atol=1e-6)


def test_single_process_lora_same_path_and_peft_adapter(assets, single_lora, single_celora):
    out, _ = single_lora
    _loss_falls(train_losses(out))
    assert not any("grad_rel_error" in r for r in read_metrics(out))  # every layer exact
    # Same code path and export: the same adapter tensors, PEFT config differing only in nothing.
    from safetensors.torch import load_file

    lora = load_file(out / "adapter" / "adapter_model.safetensors")
    celora = load_file(single_celora[0] / "adapter" / "adapter_model.safetensors")
    assert lora.keys() == celora.keys() and all(lora[k].shape == celora[k].shape for k in lora)

    # Independent check with PEFT: the exported adapter lowers the base model's loss.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from celora_dist.train.data import collate, read_records, tokenize

    tok = AutoTokenizer.from_pretrained(assets["model"])
    batch = collate(tokenize(read_records(assets["alpaca"])[:32], tok, 64).to_list(), tok.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    with torch.no_grad():
        base_loss = float(base(**batch).loss)
        tuned = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        tuned_loss = float(tuned(**batch).loss)
    assert tuned_loss < 0.8 * base_loss, (base_loss, tuned_loss)


# ---- bad input fails fast, with a message naming the culprit -----------------------------------

def _load_train_module():
    spec = importlib.util.spec_from_file_location("celora_train_launch", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def clean_env():
    saved = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _bad_inputs(assets, tmp):
    model, mc = str(assets["model"]), str(assets["mc"])
    broken = tmp / "broken.jsonl"
    lines = assets["mc"].read_text().splitlines()[:5]
    broken.write_text("\n".join(lines[:2] + ['{"question": "red cat", "options": "A. x\\nB. y",'] + lines[3:]) + "\n")
    wrong_answer = tmp / "wrong.jsonl"
    wrong_answer.write_text(json.dumps({"question": "q", "options": "A. x\nB. y", "answer": "C. z"}) + "\n")
    unknown_key = tmp / "unknown_key.json"
    unknown_key.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimisation": {"stage": 2}}))
    unknown_zero = tmp / "unknown_zero.json"
    unknown_zero.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comms": True}}))
    mismatch = tmp / "mismatch.json"
    mismatch.write_text(json.dumps({"train_batch_size": 12, "zero_optimization": {"stage": 2}}))
    mb_clash = tmp / "mb_clash.json"
    mb_clash.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}))
    lamb = tmp / "lamb.json"
    lamb.write_text(json.dumps({"optimizer": {"type": "Lamb", "params": {"lr": "auto"}}, "zero_optimization": {"stage": 2}}))
    empty_dir = tmp / "no_ckpt"
    empty_dir.mkdir(exist_ok=True)
    chat = tmp / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "red"}, {"role": "assistant", "content": "blue"}]}))
    bad_role = tmp / "bad_role.jsonl"
    bad_role.write_text(json.dumps({"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}))
    base = ["--model", model, "--data", mc, *TINY_FLAGS, "--max-steps", "2", "--output-dir", str(tmp / "out")]
    return [
        ("missing data", ["--model", model, "--data", str(tmp / "nope.jsonl")], r"--data .*nope\.jsonl: no such file"),
        ("malformed data", ["--model", model, "--data", str(broken)], r"broken\.jsonl: line 3: malformed JSON"),
        ("bad answer", ["--model", model, "--data", str(wrong_answer)], r"wrong\.jsonl: line 1: answer 'C. z'"),
        ("unknown model", ["--model", str(tmp / "no-model"), "--data", mc], r"--model .*no-model: no such folder"),
        ("not a model", ["--model", str(tmp), "--data", mc], r"not a Hugging Face model folder"),
        ("unknown target", base + ["--keep", "foo_proj=0.5"], r"target module\(s\) \['foo_proj'\] are not in"),
        ("unknown ds key", base + ["--deepspeed_config", str(unknown_key)], r"unknown key\(s\) \['zero_optimisation'\]"),
        ("unknown zero key", base + ["--deepspeed_config", str(unknown_zero)], r"unknown zero_optimization key\(s\) \['overlap_comms'\]"),
        ("batch mismatch", base + ["--deepspeed_config", str(mismatch), "--micro-batch", "4", "--grad-accum", "1"],
         r"batch-size mismatch: .*train_batch_size = 12, but micro-batch 4 x grad-accum 1 x 1"),
        ("micro-batch clash", base + ["--deepspeed_config", str(mb_clash), "--micro-batch", "4"],
         r"batch-size mismatch: --micro-batch 4 but .* train_micro_batch_size_per_gpu = 2"),
        ("optimizer we do not build", base + ["--deepspeed_config", str(lamb)],
         r"lamb\.json: optimizer\.type = 'lamb': the trainer builds torch AdamW itself"),
        ("resume without checkpoint", base + ["--resume", str(empty_dir)], r"--resume .*no_ckpt: no checkpoint there"),
        ("unknown compile backend", base + ["--compile", "nosuch"], r"--compile nosuch: not a torch.compile backend"),
        ("keep above 1", base + ["--keep", "v_proj=1.5"], r"--keep v_proj=1.5: keep must be in \(0, 1\]"),
        ("keep zero", base + ["--keep", "o_proj=0"], r"--keep o_proj=0: keep must be in \(0, 1\]"),
        ("negative loss chunk", base + ["--loss-chunk", "-1"], r"--loss-chunk must be non-negative, got -1"),
        ("chat without template", ["--model", model, "--data", str(chat), "--eval-data", str(chat)],
         r"no chat template; give one with --chat-template FILE"),
        ("unknown reporter", base + ["--report-to", "tensorboard,mlflow"], r"--report-to: unknown reporter\(s\) \['mlflow'\]"),
        ("chat unknown role", ["--model", model, "--data", str(bad_role)], r"bad_role\.jsonl: line 1: turn 0 has role 'robot'"),
    ]


def test_bad_inputs_fail_fast_in_process(assets, tmp_path, clean_env):
    """Every bad input raises UsageError naming it before torch.distributed or the model start."""
    import torch.distributed as dist

    from celora_dist.train.cli import UsageError

    train = _load_train_module()
    for name, argv, pattern in _bad_inputs(assets, tmp_path):
        with pytest.raises(UsageError, match=pattern):
            train.main(argv)
        assert not dist.is_initialized(), name
        assert not (tmp_path / "out").exists(), f"{name}: work started before the error"


def test_bad_input_exits_with_message(assets, tmp_path):
    """As a real process: exit status 2 and 'error: ...' on stderr, no traceback."""
    broken = tmp_path / "broken.jsonl"
    broken.write_text(assets["mc"].read_text().splitlines()[0] + "\n{not json\n")
    proc = run_train(["--model", str(assets["model"]), "--data", str(broken), "--output-dir", str(tmp_path / "out")],
                     timeout=120)
    assert proc.returncode == 2, show(proc)
    assert "error: " in proc.stderr and "broken.jsonl: line 2: malformed JSON" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_exact_mode_is_the_lora_method():
    """--method lora and CE-LoRA with keep = 1 everywhere build the same configuration (so the
    ZeRO-3 LoRA run of test_train_distributed also covers CE-LoRA's exact mode)."""
    from celora_dist.train.cli import build_parser, celora_config_from_args

    def cfg(argv):
        return celora_config_from_args(build_parser().parse_args(argv)).to_dict()

    exact = cfg(["--keep", "v_proj=1,o_proj=1,up_proj=1,down_proj=1"])
    lora = cfg(["--method", "lora"])
    assert exact["keep"] == lora["keep"] == {}
    assert sorted(exact["exact"]) == sorted(lora["exact"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert {k: v for k, v in exact.items() if k != "exact"} == {k: v for k, v in lora.items() if k != "exact"}
    partial = cfg(["--keep", "v_proj=0.3,q_proj=0.9", "--refresh-every", "7", "--no-sync-indices"])
    assert partial["keep"]["v_proj"] == 0.3 and partial["keep"]["q_proj"] == 0.9 and "q_proj" not in partial["exact"]
    assert partial["refresh_every"] == 7 and partial["sync_indices"] is False


def test_report_to_tensorboard_and_csv(assets, tmp_path):
    """--report-to tensorboard,csv: DeepSpeed's monitor writes loss and CE-LoRA's dX errors; the CSV
    files and the TensorBoard event files hold the same values as metrics.jsonl. Run under the
    default CELORA_KERNEL=auto: the measured dX backend choice shows in the metrics, the monitor
    and the log."""
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    proc = run_train(["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS, "--max-steps", "6",
                      "--refresh-every", "2", "--micro-batch", "4", "--report-to", "tensorboard,csv",
                      "--no-final-eval", "--output-dir", str(out)], extra_env={"CELORA_KERNEL": "auto"})
    assert proc.returncode == 0, show(proc)
    records = {r["step"]: r for r in read_metrics(out) if "eval" not in r}
    # the first approximate step (1, after refresh 0) measured every approximate layer that runs dX
    chosen = {s: r["dx_backend"] for s, r in records.items() if "dx_backend" in r}
    assert list(chosen) == [1] and set(chosen[1].values()) <= {"exact", "torch"}
    assert {n.rsplit(".", 1)[1] for n in chosen[1]} == {"v_proj", "o_proj", "up_proj", "down_proj"}
    share = list(csv.reader(open(out / "logs" / "csv" / "CELoRA_dx_approximate_share.csv")))[1:]
    approx = sum(b != "exact" for b in chosen[1].values()) / len(chosen[1])
    assert [(int(s), float(v)) for s, v in share] == [(1, pytest.approx(approx))]
    assert "dX backend, chosen by measurement:" in proc.stdout + proc.stderr
    rows = list(csv.reader(open(out / "logs" / "csv" / "Train_loss.csv")))
    assert [(int(s), float(v)) for s, v in rows[1:]] == [(s, pytest.approx(r["loss"])) for s, r in sorted(records.items())]
    mean_rows = list(csv.reader(open(out / "logs" / "csv" / "CELoRA_dx_rel_error_mean.csv")))
    assert [int(s) for s, _ in mean_rows[1:]] == [2, 4]  # refresh steps 2 and 4 (steps count from 0)
    tb_dirs = [p.parent for p in (out / "logs" / "tensorboard").rglob("events.out.tfevents.*")]
    acc = EventAccumulator(str(tb_dirs[0]))
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("Train/loss")}
    assert loss == {s: pytest.approx(r["loss"], rel=1e-6) for s, r in records.items()}
    layer_tags = [t for t in acc.Tags()["scalars"] if t.startswith("CELoRA/dx_rel_error/")]
    assert layer_tags and any(t.endswith("v_proj") for t in layer_tags)
    v_tag = next(t for t in layer_tags if t.endswith("v_proj"))
    name = v_tag.removeprefix("CELoRA/dx_rel_error/")
    assert {e.step: e.value for e in acc.Scalars(v_tag)}[4] == pytest.approx(records[4]["grad_rel_error"][name], rel=1e-6)
