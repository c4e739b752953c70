"""``launch/train.py --quantize`` (CE-QLoRA) in real processes: 2 ranks of ZeRO-2 on the CPU (gloo).

- 2-rank ZeRO-2 on an NF4 base, 8 steps (checkpoint at 4 and 8): the loss falls, both ranks hold
  identical indices, the adapter loads with ``PeftModel.from_pretrained`` on the same 4-bit base
  and reproduces the trainer's held-out loss;
- resumed from the step-4 checkpoint it ends with the identical adapter and indices;
- a folder saved already quantized trains without ``--quantize`` (the TRL way: a stored QLoRA base);
- bad combinations stop with one UsageError before any work (ZeRO-3, TP, a re-quantized folder,
  bitsandbytes missing).
Layer-level numerics against PEFT's QLoRA are in tests/test_qlora.py.
"""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from .test_train_single import _load_train_module, clean_env  # noqa: F401 (a fixture)
from .train_utils import TINY_FLAGS, read_metrics, run_train, show, train_losses

QLORA = [*TINY_FLAGS, "--micro-batch", "4", "--max-steps", "8", "--refresh-every", "4", "--save-every", "4",
         "--eval-samples", "16", "--dump-celora-state", "--quantize", "nf4", "--deepspeed_config", "ds_configs/zero2.json"]


def _state(out, rank: int) -> dict:
    return torch.load(out / "celora_state" / f"rank{rank}.pt", weights_only=False)


def _approximate(state: dict) -> list[str]:
    return [n for n in state if state[n]["selected"] is not None]


@pytest.fixture(scope="module")
def zero2_nf4(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora_z2")
    args = ["--model", str(assets["model"]), "--data", str(assets["mc"]), *QLORA]
    proc = run_train(args + ["--output-dir", str(out)], nproc=2)
    assert proc.returncode == 0, show(proc)
    return out, args, proc


def test_zero2_nf4_trains_with_identical_indices_on_both_ranks(zero2_nf4):
    out, _, proc = zero2_nf4
    assert "nf4 base (CE-QLoRA)" in proc.stdout + proc.stderr
    losses = train_losses(out)
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0], losses
    a, b = _state(out, 0), _state(out, 1)
    names = _approximate(a)
    assert len(names) == 8  # v/o/up/down of 2 blocks (released config)
    for name in names:
        assert torch.equal(a[name]["selected"], b[name]["selected"]), name


def test_adapter_loads_on_the_same_4bit_base_and_reproduces_the_held_out_loss(assets, zero2_nf4):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from celora_dist.train.data import file_task
    from celora_dist.train.evaluate import evaluate
    from celora_dist.train.quantize import load_kwargs

    out, _, _ = zero2_nf4
    base = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32, **load_kwargs("nf4", "fp32"))
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    # bitsandbytes 0.50.2 repacks a 4-bit weight for AVX512-BF16 CPUs in an eval forward and fails on
    # in_features 96 (down_proj here: "shape '[64, 1]' is invalid for input of size 96"); keep its plain path
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    assert type(model.base_model.model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"  # peft's lora.bnb
    final = [r for r in read_metrics(out) if "eval_loss" in r][-1]
    # the trainer's held-out answer loss, recomputed through PEFT on the 4-bit base (its evaluate.py)
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    _, held_out, _ = file_task([str(assets["mc"])], None, 0.1, "letter")
    result = evaluate(model, tokenizer, held_out[:16], 64, torch.device("cpu"))
    assert result["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-4)  # fp32, same quantized W0


def test_merge_folds_the_adapter_into_the_dequantized_base(assets, zero2_nf4, tmp_path):
    """``python -m celora_dist.merge --quantize nf4``: a dense model whose logits are the adapter-on-4-bit-base
    model's (fp32: the merge adds s·B A to deq(W0) once, the PEFT model adds its products: 1e-4 apart)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from celora_dist import merge
    from celora_dist.train.quantize import load_kwargs

    out, _, _ = zero2_nf4
    merged_dir = tmp_path / "merged"
    assert merge.main(["--model", str(assets["model"]), "--adapter", str(out / "adapter"), "--out", str(merged_dir),
                       "--quantize", "nf4"]) == 0
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32, **load_kwargs("nf4", "fp32"))
    adapted = PeftModel.from_pretrained(base, str(out / "adapter")).train()  # train(): bitsandbytes' plain path
    ids = torch.randint(0, merged.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit, match=r"error: --out .* already exists"):
        merge.main(["--model", str(assets["model"]), "--adapter", str(out / "adapter"), "--out", str(merged_dir),
                    "--quantize", "nf4"])


def test_resume_from_step_4_ends_identical(assets, zero2_nf4, tmp_path):
    out, args, _ = zero2_nf4
    # what a run stopped after its step-4 save leaves: step000004 complete and named by `latest`
    ckpts = tmp_path / "stopped" / "checkpoints"
    shutil.copytree(out / "checkpoints" / "step000004", ckpts / "step000004")
    (ckpts / "latest").write_text("step000004")
    resumed = tmp_path / "resumed"
    proc = run_train(args + ["--output-dir", str(resumed), "--resume", str(ckpts.parent)], nproc=2)
    assert proc.returncode == 0, show(proc)
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for rank in (0, 1):
        s, r = _state(out, rank), _state(resumed, rank)
        assert all(torch.equal(s[n]["selected"], r[n]["selected"]) for n in _approximate(s))


@pytest.fixture(scope="module")
def stored_4bit(assets, tmp_path_factory):
    """The tiny model saved already quantized (NF4, double quant): config.json carries its quantization_config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from celora_dist.train.quantize import load_kwargs

    folder = tmp_path_factory.mktemp("stored_nf4")
    model = AutoModelForCausalLM.from_pretrained(assets["model"], **load_kwargs("nf4", "fp32"))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(assets["model"]).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    return folder


def test_a_stored_4bit_folder_trains_with_preset_fast_under_zero1(assets, stored_4bit, tmp_path):
    """No --quantize: the stored quantization is used; --preset fast (all seven adaptive, vocab-sparse head)."""
    out = tmp_path / "out"
    proc = run_train(["--model", str(stored_4bit), "--data", str(assets["mc"]), *TINY_FLAGS, "--max-steps", "4",
                      "--refresh-every", "2", "--eval-samples", "8", "--preset", "fast", "--deepspeed_config",
                      "ds_configs/zero1.json", "--dump-celora-state", "--output-dir", str(out)])
    assert proc.returncode == 0, show(proc)
    assert len(train_losses(out)) == 4 and "ZeRO-1" in proc.stdout + proc.stderr
    state = _state(out, 0)
    assert "lm_head" in state and len(state) == 14 + 1  # 14 adaptive projections + the vocab-sparse head


def test_bad_quantized_runs_fail_fast_in_process(assets, stored_4bit, tmp_path, clean_env, monkeypatch, capsys):
    """One UsageError naming the culprit, before torch.distributed or any output exists."""
    import torch.distributed as dist

    from celora_dist.train.errors import UsageError

    train = _load_train_module()
    base = ["--model", str(assets["model"]), "--data", str(assets["mc"]), *TINY_FLAGS, "--max-steps", "2",
            "--output-dir", str(tmp_path / "out")]
    gptq = tmp_path / "gptq"
    shutil.copytree(assets["model"], gptq)
    config = json.loads((gptq / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    cases = [
        (base + ["--quantize", "nf4", "--deepspeed_config", "ds_configs/zero3.json"],
         r"--quantize nf4: ZeRO-3 would partition .* use ZeRO-2"),
        (["--model", str(stored_4bit), *base[2:], "--quantize", "fp4"],
         r"--quantize fp4: --model .* is already quantized \(bitsandbytes_4bit\); drop --quantize"),
        (["--model", str(gptq), *base[2:]], r"stored gptq\): only bitsandbytes quantization"),
    ]
    for argv, pattern in cases:
        with pytest.raises(UsageError, match=pattern):
            train.main(argv)
        assert not dist.is_initialized() and not (tmp_path / "out").exists(), pattern
    with pytest.raises(SystemExit):  # argparse's one error line after its usage
        train.main(base + ["--quantize", "nf8"])
    assert "error: argument --quantize: invalid choice: 'nf8'" in capsys.readouterr().err
    # tensor parallelism over 2 ranks: the check runs in prepare(), before any process group
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UsageError, match=r"--quantize int8: tensor parallelism .* not supported"):
        train.main(base + ["--quantize", "int8", "--tp", "2"])
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    # bitsandbytes missing: an import that fails (None in sys.modules makes `import` raise ImportError)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UsageError, match=r"--quantize nf4 needs bitsandbytes: pip install"):
        train.main(base + ["--quantize", "nf4"])
    assert not dist.is_initialized() and not (tmp_path / "out").exists()
