"""Generation-based evaluation (``--eval-mode generate``): greedy decoding, answer extraction,
exact match — the protocol of LLM-Adapters, which the CE-LoRA paper uses for Commonsense170K
and Math10K, where the answer is a word or a number inside free text, not a choice to score.

The gold answer decides what is extracted from the generated text:
- an option letter (``B``) -> the first standalone capital letter A-E;
- yes/no or true/false -> the first such word;
- a number -> the last number in the text (Math10K's convention), compared with a tolerance;
- an LLM-Adapters answer word (``option2``, ``answer1``, ``solution2``, ``ending4``) -> the
  first word of that family;
- anything else -> the text itself, normalised (case, whitespace, final punctuation).
Examples are split over the data-parallel ranks like :func:`evaluate.evaluate`; every rank
runs the same number of ``generate`` calls with ``synced_gpus`` under ZeRO-3, so the
collective parameter gathers stay in step.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import torch
import torch.distributed as dist

from .data import encode

_LETTER = re.compile(r"^[A-E]$")
_WORD_FAMILY = re.compile(r"^(option|answer|solution|ending)\d+$", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")
_YES_NO = {"yes": "yes", "no": "no", "true": "true", "false": "false"}


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def answer_kind(gold: str) -> str:
    """What to extract for this gold answer: letter, yesno, number, word or text."""
    g = gold.strip()
    if _LETTER.match(g):
        return "letter"
    if g.lower() in _YES_NO:
        return "yesno"
    if _NUMBER.fullmatch(g) and _number(g) is not None:
        return "number"
    if _WORD_FAMILY.match(g):
        return "word"
    return "text"


def extract(text: str, kind: str) -> str | None:
    """The answer found in generated ``text`` for an answer of ``kind`` (None: none found)."""
    if kind == "letter":
        m = re.search(r"(?<![A-Za-z])([A-E])(?![A-Za-z])", text)
        return m.group(1) if m else None
    if kind == "yesno":
        m = re.search(r"\b(yes|no|true|false)\b", text, re.IGNORECASE)
        return m.group(1).lower() if m else None
    if kind == "number":
        found = [n for n in _NUMBER.findall(text) if _number(n) is not None]
        return found[-1] if found else None
    if kind == "word":
        m = re.search(r"\b((?:option|answer|solution|ending)\d+)\b", text, re.IGNORECASE)
        return m.group(1).lower() if m else None
    return _normalise(text.strip().splitlines()[0]) if text.strip() else None


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!?")


def is_correct(generated: str, gold: str) -> bool:
    kind = answer_kind(gold)
    found = extract(generated, kind)
    if found is None:
        return False
    if kind == "number":
        return math.isclose(_number(found), _number(gold.strip()), rel_tol=0, abs_tol=1e-4)
    return found == (gold.strip() if kind == "letter" else _normalise(gold) if kind == "text" else gold.strip().lower())


@torch.no_grad()
def generate_answer(model, tokenizer, prompt: str, seq_len: int, max_new_tokens: int, device, synced: bool) -> str:
    """Greedy continuation of ``prompt`` (the training prompt format), decoded, special tokens dropped."""
    ids, start = encode(tokenizer, prompt, "", seq_len, eos=False)
    x = torch.tensor([ids[:start]], device=device)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1, use_cache=True, synced_gpus=synced,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                         else tokenizer.eos_token_id)
    return tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True)


def generate_eval(model, tokenizer, records: list[dict], seq_len: int, device, max_new_tokens: int,
                  group=None, synced: bool = False, progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """Exact-match accuracy of greedy generations over the prompt/answer records of ``records``
    (chat records are skipped: their gold is a whole assistant turn). ``synced``: ZeRO-3."""
    scored = [r for r in records if "messages" not in r]
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if dist.is_initialized() else (0, 1)
    per_rank = math.ceil(len(scored) / world)
    was_training = model.training
    model.eval()
    correct = counted = 0
    try:
        for i in range(rank * per_rank, (rank + 1) * per_rank):  # empty when nothing is scored
            rec = scored[i] if i < len(scored) else scored[0]
            text = generate_answer(model, tokenizer, rec["prompt"], seq_len, max_new_tokens, device, synced)
            if progress is not None:
                progress()
            if i < len(scored):  # padding keeps the ranks' generate calls in step, counts nothing
                counted += 1
                correct += is_correct(text, rec["answer"])
    finally:
        model.train(was_training)
    totals = torch.tensor([correct, counted], dtype=torch.float64, device=device)
    if dist.is_initialized() and world > 1:
        dist.all_reduce(totals, group=group)
    correct, counted = totals.tolist()
    return {"gen_accuracy": correct / counted, "gen_examples": int(counted)} if counted else {}
