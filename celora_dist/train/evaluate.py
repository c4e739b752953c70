"""Held-out evaluation: multiple-choice accuracy and answer-token loss.

A question is answered by the choice whose tokens get the highest total
log-probability after the prompt (lm-eval's "acc"); when every choice is one token
(letters, yes/no) the forward that measures the answer loss scores them all,
otherwise one batched forward over prompt + each choice does. Examples are
sharded over data-parallel ranks and padded so every rank runs the same number of
forwards (ZeRO-3 gathers parameters, and TP layers exchange activations, collectively
inside forward). Only the positions that score an answer go through the LM head
(HF's ``logits_to_keep``): for SmolLM2 the head is a fifth of a forward's FLOPs and its
full-vocabulary log-softmax over every prompt position was the rest of the waste.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import IGNORE, encode, example_ids


def _choice_ids(tokenizer, choices: list[str]) -> list[list[int]]:
    return [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in choices]


def _last_logits(model, keep: int, **inputs) -> torch.Tensor:
    """Logits of the last ``keep`` positions (all positions' head work skipped where the model allows)."""
    try:
        return model(**inputs, logits_to_keep=keep).logits
    except TypeError as err:  # a causal LM without logits_to_keep: compute all, slice
        if "logits_to_keep" not in str(err):
            raise
        return model(**inputs).logits[:, -keep:]


def _needs_choice_forward(tokenizer, records: list[dict]) -> bool:
    """True when some record has a multi-token choice (scored by a batched forward)."""
    return any(len(c) != 1 for r in records if r["choices"] for c in _choice_ids(tokenizer, r["choices"]))


@torch.no_grad()
def _score_example(model, tokenizer, record: dict, seq_len: int, device,
                   choice_forward: bool) -> tuple[int, float, int]:
    """(predicted choice or -1, answer-token loss sum, answer-token count).

    Exactly one forward per record, so ranks stay in step under ZeRO-3.
    choice_forward=False: prompt + answer + EOS; single-token choices are scored at the
    first answer position. True: one batch of prompt + each choice (no EOS); the loss is
    that of the correct choice.
    """
    if not choice_forward or "messages" in record:
        ids, labels = example_ids(tokenizer, record, seq_len)
        scored = [i for i, label in enumerate(labels) if label != IGNORE]
        start = max(1, scored[0] if scored else len(ids) - 1)  # token 0 predicts nothing
        x = torch.tensor([ids], device=device)
        keep = len(ids) - start + 1  # positions start-1 .. end predict the answer tokens (+ one unused)
        logp = F.log_softmax(_last_logits(model, keep, input_ids=x)[0, :-1].float(), dim=-1)
        target = torch.tensor(labels[start:], device=device)
        counted = target != IGNORE
        nll = float(-logp[counted].gather(1, target[counted][:, None]).sum())
        pred = -1
        if record["choices"]:
            first = logp[0]
            pred = int(torch.stack([first[c[0]] for c in _choice_ids(tokenizer, record["choices"])]).argmax())
        return pred, nll, int(counted.sum())
    prompt, s = encode(tokenizer, record["prompt"], "", seq_len, eos=False)
    prompt = prompt[:s]
    cids = _choice_ids(tokenizer, record["choices"] or [record["answer"]])
    seqs = [(prompt + c)[-seq_len:] for c in cids]
    width = max(len(q) for q in seqs)
    batch = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(batch)
    for i, q in enumerate(seqs):
        batch[i, :len(q)] = torch.tensor(q)
        mask[i, :len(q)] = 1
    first = max(0, min(len(q) - len(c) - 1 for q, c in zip(seqs, cids)))  # earliest position scoring a choice
    lp = F.log_softmax(_last_logits(model, width - first, input_ids=batch, attention_mask=mask).float(), dim=-1)
    scores = []
    for i, (q, c) in enumerate(zip(seqs, cids)):
        pos = torch.arange(len(q) - len(c), len(q), device=device)
        scores.append(lp[i, pos - 1 - first, batch[i, pos]].sum())
    gold = record["label"] if record["choices"] else 0
    pred = int(torch.stack(scores).argmax()) if record["choices"] else -1
    return pred, float(-scores[gold]), len(cids[gold])


def evaluate(model, tokenizer, records: list[dict], seq_len: int, device, group=None,
             progress: Callable[[], None] | None = None) -> dict[str, float]:
    """Accuracy (multiple-choice records), mean answer-token loss over ``records``, and
    ``majority_rate``: the accuracy of always picking the most frequent gold choice.

    ``group``: the data-parallel group the examples are split over (default: the
    world). With tensor parallelism pass the DP group: the ranks of a TP group must
    run the same forwards (their layers exchange activations).
    """
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if dist.is_initialized() else (0, 1)
    per_rank = math.ceil(len(records) / world)
    progress = progress or (lambda: None)  # called per example: a long evaluation is progress too
    mine = [records[i] if i < len(records) else None for i in range(rank * per_rank, (rank + 1) * per_rank)]
    was_training = model.training
    model.eval()
    correct = counted = nll = ntok = 0.0
    n_choices = max((len(r["choices"]) for r in records if r["choices"]), default=0)
    labels = torch.zeros(n_choices, dtype=torch.float64)  # gold-label counts: the majority baseline
    choice_forward = _needs_choice_forward(tokenizer, records)
    try:
        for rec in mine:
            pred, loss, n = _score_example(model, tokenizer, rec or records[0], seq_len, device, choice_forward)
            progress()
            if rec is None:  # padding: keep the collective forwards in step, count nothing
                continue
            nll += loss
            ntok += n
            if rec["choices"]:
                counted += 1
                correct += pred == rec["label"]
                labels[rec["label"]] += 1
    finally:
        model.train(was_training)
    totals = torch.cat([torch.tensor([correct, counted, nll, ntok], dtype=torch.float64), labels])
    if dist.is_initialized() and world > 1:
        dist.all_reduce(totals, group=group)
    correct, counted, nll, ntok = totals[:4].tolist()
    out = {"eval_loss": nll / max(ntok, 1), "eval_examples": len(records)}
    if counted:
        out["accuracy"] = correct / counted
        # always answering the most frequent gold choice: the floor a fine-tune must beat
        out["majority_rate"] = float(totals[4:].max()) / counted
    return out
