"""Held-out evaluation against a hand-computed reference: each sequence alone, full logits.

evaluate() batches the choices of a question (right padding) and sends only the answer
positions through the LM head (``logits_to_keep``); the reference runs every
prompt + choice as its own unpadded forward and reads log-probabilities off the full
logits.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from celora_dist.train.data import encode, read_records
from celora_dist.train.evaluate import evaluate

SEQ_LEN = 64


def _reference(model, tok, records, letter: bool):
    correct = nll = ntok = 0.0
    for rec in records:
        prompt, start = encode(tok, rec["prompt"], "", SEQ_LEN, eos=False)
        prompt = prompt[:start]
        scores = []
        for choice in rec["choices"]:
            cid = tok(" " + choice, add_special_tokens=False)["input_ids"]
            if letter:  # single-token choices: log-prob of the first answer token after the prompt
                ids, s = encode(tok, rec["prompt"], rec["answer"], SEQ_LEN)
                logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
                scores.append(float(logp[s - 1, cid[0]]))
            else:
                ids = (prompt + cid)[-SEQ_LEN:]
                logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
                scores.append(sum(float(logp[p - 1, ids[p]]) for p in range(len(ids) - len(cid), len(ids))))
        correct += max(range(len(scores)), key=scores.__getitem__) == rec["label"]
        if letter:  # the loss is over the whole answer (+ EOS) of the training format
            ids, s = encode(tok, rec["prompt"], rec["answer"], SEQ_LEN)
            logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            nll -= sum(float(logp[p - 1, ids[p]]) for p in range(s, len(ids)))
            ntok += len(ids) - s
        else:
            nll -= scores[rec["label"]]
            ntok += len(tok(" " + rec["choices"][rec["label"]], add_special_tokens=False)["input_ids"])
    return correct / len(records), nll / ntok


@pytest.mark.parametrize("mc_format", ["text", "letter"])
def test_evaluate_equals_per_sequence_reference(assets, mc_format):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["model"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    with torch.no_grad():  # an untrained tiny model answers at chance: perturb it so scores differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    records = read_records(assets["mc"], mc_format)[:24]
    with torch.no_grad():
        got = evaluate(model, tok, records, SEQ_LEN, torch.device("cpu"))
        accuracy, loss = _reference(model, tok, records, mc_format == "letter")
    assert got["eval_examples"] == len(records)
    assert got["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert got["eval_loss"] == pytest.approx(loss, rel=1e-4)
    labels = [r["label"] for r in records]
    assert got["majority_rate"] == max(labels.count(c) for c in set(labels)) / len(records)
