"""CE-LoRA in Hugging Face Trainer / TRL SFTTrainer (celora_dist/integrations/hf_trainer.py), in
real processes: one process, and two ranks under ``accelerate launch`` with DeepSpeed ZeRO-2/3.

The runs are tests/hf_trainer_run.py on the tiny test model; it records per optimizer step
whether the backward was exact (refresh step) or approximate, and the final schedule state.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .train_utils import REPO, env, free_port

RUNNER = REPO / "tests" / "hf_trainer_run.py"


def run(assets: dict, out: Path, *flags: str, nproc: int = 1, zero: int | None = None,
        timeout: int = 300) -> dict:
    """Run the runner; return rank 0's record (raises with the output on failure)."""
    args = ["--assets", str(assets["model"].parent), "--out", str(out), *flags]
    if nproc == 1:
        cmd = [sys.executable, str(RUNNER), *args]
    else:
        config = REPO / "ds_configs" / f"zero{zero}.json"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
               "--deepspeed_config_file", str(config), "--num_processes", str(nproc), "--num_machines", "1",
               "--main_process_port", str(free_port()), str(RUNNER), *args]
    proc = subprocess.run(["timeout", "-k", "10", str(timeout), *cmd], cwd=REPO, env=env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    record = json.loads((out / "record-rank0.json").read_text())
    record["stderr"] = proc.stderr
    return record


def tensors_in(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor stored under ``folder`` (safetensors and torch pickles), by file:key."""
    from safetensors.torch import load_file

    found = {}
    for path in folder.rglob("*"):
        if path.suffix == ".safetensors":
            found.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
        elif path.suffix in (".pt", ".pth", ".bin"):
            def walk(obj, prefix):
                if isinstance(obj, torch.Tensor):
                    found[prefix] = obj
                elif isinstance(obj, dict):
                    for k, v in obj.items():
                        walk(v, f"{prefix}.{k}")
                elif isinstance(obj, (list, tuple)):
                    for i, v in enumerate(obj):
                        walk(v, f"{prefix}.{i}")
            walk(torch.load(path, map_location="cpu", weights_only=False), path.name)
    return found


@pytest.fixture(scope="module")
def sft_run(assets, tmp_path_factory):
    """SFTTrainer, chat data with packing, gradient accumulation 2, refresh every 3, checkpoints every 3."""
    out = tmp_path_factory.mktemp("sft")
    flags = ["--packing", "--grad-accum", "2", "--refresh", "3", "--steps", "7", "--save-steps", "3"]
    return out, flags, run(assets, out, *flags)


def test_sft_schedule_follows_optimizer_steps(sft_run):
    out, _, record = sft_run
    steps = record["steps"]
    assert [s["global_step"] for s in steps] == list(range(7)) and record["global_step"] == 7
    # gradient accumulation does not move the schedule: one layer step per optimizer step
    assert [s["layer_step"] for s in steps] == list(range(7))
    assert [s["global_step"] for s in steps if s["refresh"]] == [0, 3, 6]
    assert all(s["approximate"] for s in steps if not s["refresh"])  # kept indices in use between refreshes
    errors = [t["rel_error"] for t in record["telemetry"].values()]
    assert errors and all(e is not None and 0 < e < 1 for e in errors)  # measured on the refresh steps
    assert all(t["step"] == 6 for t in record["telemetry"].values())
    losses = record["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learns


def assert_adapter_checkpoint(ckpt: Path, model_dir: Path) -> None:
    """``ckpt`` holds a PEFT adapter, the CE-LoRA state and optimizer state — not the frozen backbone."""
    from transformers import AutoModelForCausalLM

    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "celora_state.pt").is_file()
    backbone = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    stored = tensors_in(ckpt)
    adapter = sum(v.numel() for k, v in stored.items() if k.startswith("adapter_model"))
    assert 0 < adapter < backbone / 5
    # floating-point content ≈ adapter + Adam's two moments (+ DeepSpeed's fp32 copy and trainable
    # module states): a few adapters' worth, nothing backbone-sized
    floats = sum(v.numel() for v in stored.values() if v.is_floating_point())
    assert floats <= 5 * adapter + 100, sorted(stored)[:20]
    assert not any("base_layer.weight" in k or "embed_tokens" in k for k in stored)


def test_checkpoint_holds_adapter_and_state_not_backbone(sft_run, assets):
    out, _, _ = sft_run
    assert_adapter_checkpoint(out / "checkpoint-3", assets["model"])


def test_resume_through_trainer_matches_straight_run(sft_run, assets, tmp_path):
    from safetensors.torch import load_file

    out, flags, straight = sft_run
    resumed_out = tmp_path / "resumed"
    resumed_out.mkdir()
    shutil.copytree(out / "checkpoint-3", resumed_out / "checkpoint-3")
    resumed = run(assets, resumed_out, *flags, "--resume", str(resumed_out / "checkpoint-3"))
    assert [s["global_step"] for s in resumed["steps"]] == [3, 4, 5, 6]
    assert [s["global_step"] for s in resumed["steps"] if s["refresh"]] == [3, 6]
    assert resumed["schedule"] == straight["schedule"]  # same steps, same kept indices
    a = load_file(out / "final" / "adapter_model.safetensors")
    b = load_file(resumed_out / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # the same arithmetic in the same order: equal to float32 round-off
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


def test_resume_without_schedule_state_is_refused(sft_run, assets, tmp_path):
    out, flags, _ = sft_run
    (tmp_path / "checkpoint-3").mkdir()
    for f in (out / "checkpoint-3").iterdir():
        if f.name != "celora_state.pt":
            (shutil.copytree if f.is_dir() else shutil.copy)(f, tmp_path / "checkpoint-3" / f.name)
    with pytest.raises(AssertionError, match="celora_state.pt does not exist"):
        run(assets, tmp_path, *flags, "--resume", str(tmp_path / "checkpoint-3"))


def test_plain_trainer_driven_and_undriven(assets, tmp_path):
    """Plain transformers.Trainer: with the callback the schedule runs and stays quiet; with the
    callback forgotten the backward would stay exact forever, and a warning says what to add."""
    driven = run(assets, tmp_path / "driven", "--trainer", "plain", "--refresh", "2", "--steps", "5")
    assert [s["global_step"] for s in driven["steps"] if s["refresh"]] == [0, 2, 4]
    assert all(s["approximate"] for s in driven["steps"] if not s["refresh"])
    assert "UndrivenScheduleWarning" not in driven["stderr"]
    record = run(assets, tmp_path / "undriven", "--trainer", "plain", "--no-callback", "--micro", "1", "--steps", "66")
    assert "UndrivenScheduleWarning" in record["stderr"] and "callbacks=[callback]" in record["stderr"]
    assert all(s["refresh"] and not s["approximate"] for s in record["steps"])  # what it warns about


def test_plain_trainer_bf16_autocast_approximates_and_lowers_the_loss(assets, tmp_path):
    """Trainer(bf16=True) on the CPU (autocast, fp32 master weights) with the callback: the layers
    compute in bf16, the schedule refreshes and approximates, and the loss falls."""
    record = run(assets, tmp_path, "--trainer", "plain", "--bf16", "--refresh", "2", "--steps", "8",
                 "--lr", "1e-2")
    assert record["train_output_dtypes"] == ["torch.bfloat16"]
    assert [s["global_step"] for s in record["steps"] if s["refresh"]] == [0, 2, 4, 6]
    assert all(s["approximate"] for s in record["steps"] if not s["refresh"])
    losses = record["losses"]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


def test_trainer_torch_compile_with_callback(sft_run, assets, tmp_path):
    """SFTTrainer with torch_compile=True (aot_eager: Dynamo + AOTAutograd without inductor's C++
    build, which would add ~1 min) and the callback, the sft_run's flags otherwise: the Trainer
    really compiles, the schedule advances (refresh 0, 3, 6, approximate between), and losses and
    kept indices are the eager run's."""
    _, flags, eager = sft_run
    record = run(assets, tmp_path, *flags, "--compile", "aot_eager")
    assert record["compiled_wrapper"] == "OptimizedModule" and record["compiled_graphs"] > 0
    assert eager["compiled_graphs"] == 0
    steps = record["steps"]
    assert [s["layer_step"] for s in steps] == list(range(7))
    assert [s["global_step"] for s in steps if s["refresh"]] == [0, 3, 6]
    assert all(s["approximate"] for s in steps if not s["refresh"])
    assert record["schedule"] == eager["schedule"]  # the same indices chosen on every refresh
    assert record["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    assert sum(record["losses"][-3:]) < sum(record["losses"][:3])  # it learns


TWO_RANK_FLAGS = ["--trainer", "sft", "--steps", "3", "--refresh", "100", "--micro", "2"]


@pytest.fixture(scope="module")
def one_process_global_batch(assets, tmp_path_factory):
    """The 2-rank runs' reference: one process, micro-batch 2 x grad-accum 2 = the same global batch."""
    return run(assets, tmp_path_factory.mktemp("one"), *TWO_RANK_FLAGS, "--grad-accum", "2")


@pytest.mark.parametrize("zero", [2, 3])
def test_accelerate_two_ranks_deepspeed(zero, assets, tmp_path, one_process_global_batch):
    """accelerate launch, 2 ranks, DeepSpeed ZeRO-2/3 with the "auto" config: indices equal on both
    ranks and to one process on the same global batch; the final adapter is a loadable PEFT adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    two = run(assets, tmp_path / "two", *TWO_RANK_FLAGS, "--save-steps", "2", nproc=2, zero=zero)
    assert two["partitioned_at_load"] == (zero == 3)  # ZeRO-3: for_trainer ran on a zero.Init-partitioned model
    assert_adapter_checkpoint(tmp_path / "two" / "checkpoint-2", assets["model"])
    rank1 = json.loads((tmp_path / "two" / "record-rank1.json").read_text())
    assert two["schedule"] == rank1["schedule"]
    assert two["schedule"] == one_process_global_batch["schedule"]  # the step-0 scores summed over the same 4 examples
    assert any(s["selected"] for s in two["schedule"].values())

    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 and t.dim() == 2 for t in adapter.values())  # not ZeRO-3's empty shards
    assert {t.shape[0] for k, t in adapter.items() if "lora_A" in k} == {4}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), tmp_path / "two" / "final")
    probe = torch.load(tmp_path / "two" / "probe.pt")
    with torch.no_grad():
        logits = model.eval()(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=0, atol=1e-5)


def test_peft_composition_matches_fused_layer(assets):
    """PEFT's LoRA around CELoRALinear(r=0) gives the fused CE-LoRA layer's input gradient and loss,
    on refresh (exact) and approximate steps alike: PEFT adds s·(G B) A exactly, the base layer the rest."""
    from transformers import AutoModelForCausalLM

    import celora_dist
    from celora_dist import CELoRAConfig, inject_celora, on_optimizer_step

    cfg = CELoRAConfig(r=4, alpha=8, r0=4, refresh_every=2)
    fused = inject_celora(AutoModelForCausalLM.from_pretrained(assets["model"]), cfg, verbose=False)
    peft_model, _ = celora_dist.for_trainer(AutoModelForCausalLM.from_pretrained(assets["model"]), cfg, verbose=False)
    fused_params = dict(fused.named_parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # same LoRA weights in both, with B non-zero so the LoRA term matters
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                twin = fused_params[name.replace("base_model.model.", "").replace(".default", "")]
                if "lora_B" in name:
                    twin.copy_(torch.randn(twin.shape, generator=g) * 0.1)
                param.copy_(twin)
    for step in range(4):  # steps 0, 2 refresh; 1, 3 approximate
        ids = torch.randint(4, 30, (2, 12), generator=g)
        grads = []
        for model in (fused, peft_model):
            emb = fused.model.embed_tokens(ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=emb, labels=ids).loss
            loss.backward()
            grads.append((loss.detach(), emb.grad))
            on_optimizer_step(model)
            model.zero_grad()
        torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-6, msg=f"step {step}")
    kept = [m.selected for _, m in celora_dist.layer.celora_layers(peft_model)]
    assert all(k is not None for k in kept)  # the approximate steps did approximate
