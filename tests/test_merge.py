"""python -m celora_dist.merge: a CE-LoRA adapter folded into its base model, as a real process."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from .train_utils import REPO, env


def run_merge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "celora_dist.merge", *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_adapter(assets, tmp_path_factory):
    """An adapter saved from a CE-LoRA model with non-zero LoRA B (so the merge changes the logits)."""
    from transformers import AutoModelForCausalLM

    from celora_dist import CELoRAConfig, inject_celora, save_adapter

    model = inject_celora(AutoModelForCausalLM.from_pretrained(assets["model"]), CELoRAConfig(r=4, alpha=8, r0=4),
                          verbose=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return save_adapter(model, tmp_path_factory.mktemp("merge") / "adapter")


def test_merged_model_matches_adapter_model(assets, trained_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    proc = run_merge("--model", str(assets["model"]), "--adapter", str(trained_adapter), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())  # a plain model
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), trained_adapter)
    base = AutoModelForCausalLM.from_pretrained(assets["model"])
    ids = torch.randint(4, 30, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got, before = (m.eval()(input_ids=ids).logits for m in (reference, merged, base))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - before).abs().max() > 1e-2  # the adapter matters, so the match is not trivial
    assert (out / "tokenizer_config.json").is_file()


def refusal(*args: str) -> str:
    """The one-line error main() exits with (checked in-process: no model is loaded before it)."""
    from celora_dist.merge import main

    with pytest.raises(SystemExit) as stop:
        main(list(args))
    return str(stop.value.code)


def test_merge_refuses_bad_paths_and_keeps_existing_output(assets, trained_adapter, tmp_path):
    msg = refusal("--model", str(tmp_path / "nope"), "--adapter", str(trained_adapter), "--out", str(tmp_path / "o"))
    assert msg.startswith("error: --model") and "config.json" in msg
    msg = refusal("--model", str(assets["model"]), "--adapter", str(tmp_path), "--out", str(tmp_path / "o"))
    assert msg.startswith("error: --adapter") and "adapter_config.json" in msg
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("earlier work")
    msg = refusal("--model", str(assets["model"]), "--adapter", str(trained_adapter), "--out", str(existing))
    assert "--overwrite" in msg and "\n" not in msg
    assert (existing / "keep.txt").read_text() == "earlier work"
