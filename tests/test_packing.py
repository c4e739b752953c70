"""--packing: a micro-batch's examples in one sequence (position ids restarting, no attention mask)
gives each example the logits it gets alone, and the padded batch's loss and gradients; a packed
training run reproduces the padded one's losses."""
from __future__ import annotations

import json

import torch

from celora_dist.train.data import collate, collate_packed

from .train_utils import TINY_FLAGS, read_metrics, run_train, show, train_losses


def _rows(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(4, 30, (n,), generator=g).tolist()
        start = n // 2  # the second half is the "answer"
        rows.append({"input_ids": ids, "labels": [-100] * start + ids[start:]})
    return rows


def test_packed_logits_equal_each_example_alone(assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()  # KV cache off below, as in training
    rows = _rows([7, 12, 3, 9])
    packed = collate_packed(rows)
    assert packed["position_ids"][0].tolist() == [p for n in (7, 12, 3, 9) for p in range(n)]
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        offset = 0
        for r in rows:  # reference: each example by itself, no padding, no packing
            alone = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[offset:offset + len(r["input_ids"])], alone, rtol=1e-5, atol=1e-5)
            offset += len(r["input_ids"])


def test_packed_loss_and_gradients_equal_padded(assets):
    """CE-LoRA model: the packed micro-batch's loss, LoRA gradients (and the refresh-step scores)
    equal the right-padded micro-batch's."""
    from transformers import AutoModelForCausalLM

    from celora_dist import CELoRAConfig, inject_celora

    model = inject_celora(AutoModelForCausalLM.from_pretrained(assets["model"]), CELoRAConfig(r=4, alpha=8, r0=4),
                          verbose=False)
    model.config.use_cache = False  # as the trainer runs it: a KV cache turns packed-sequence masking off
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    rows = _rows([5, 11, 8, 2 + 6], seed=2)
    results = []
    for batch in (collate(rows, pad_id=0), collate_packed(rows)):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        scores = {n: m.pending_scores.clone() for n, m in model.named_modules() if getattr(m, "pending_scores", None) is not None}
        for m in model.modules():  # drop this step's refresh statistics before the next batch
            if hasattr(m, "load_schedule_state") and hasattr(m, "pending_scores"):
                m.load_schedule_state(m.schedule_state())
        results.append((loss.detach(), grads, scores))
    (l0, g0, s0), (l1, g1, s1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    for name in g0:
        err = ((g1[name] - g0[name]).norm() / g0[name].norm()).item()
        assert err < 1e-5, (name, err)  # float32 summation order only: measured 0.9e-6 to 3e-6
    assert s0.keys() == s1.keys() and s0  # pad positions carry zero gradient: the scores agree too
    for name in s0:
        torch.testing.assert_close(s1[name], s0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_packed_run_reproduces_padded_run(assets, tmp_path):
    flags = ["--model", str(assets["model"]), "--data", str(assets["alpaca"]), *TINY_FLAGS, "--max-steps", "8",
             "--micro-batch", "8", "--refresh-every", "3", "--eval-samples", "16"]
    losses = {}
    for mode in ("padded", "packed"):
        out = tmp_path / mode
        proc = run_train(flags + ["--output-dir", str(out)] + (["--packing"] if mode == "packed" else []))
        assert proc.returncode == 0, show(proc)
        losses[mode] = train_losses(out)
        tokens = [r["tokens"] for r in read_metrics(out) if "eval" not in r]
        losses[mode + "_tokens"] = tokens
    assert losses["packed"] == __import__("pytest").approx(losses["padded"], rel=0, abs=2e-5)
    assert losses["packed_tokens"] == losses["padded_tokens"]  # real tokens counted, pads never
    assert json.loads((tmp_path / "packed" / "summary.json").read_text())["steps"] == 8
