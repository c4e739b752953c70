"""--eval-mode generate: answer extraction (the LLM-Adapters protocol) on a table of cases, and
the decoding pipeline against an independent greedy loop (argmax over full forwards, no cache)."""
from __future__ import annotations

import pytest
import torch

from celora_dist.train import generation

CASES = [  # (generated text, gold answer, correct?)
    ("The answer is B.", "B", True),
    ("B) because", "B", True),
    ("Both are fine, A", "B", False),  # "Both" is a word, not the letter B; A is the first letter
    ("no, it does not", "no", True),
    ("Yes.", "yes", True),
    ("True, since", "false", False),
    ("so 3,200 apples, then 12.5 in total", "12.5", True),
    ("x = 41", "42", False),
    ("The answer is 7", "7.0", True),
    ("the correct answer is option2", "option2", True),
    ("option1 or option2", "option2", False),  # the first of the family is the answer
    ("Red Cat.\nmore text", "red cat", True),
    ("", "yes", False),
]


@pytest.mark.parametrize("text, gold, correct", CASES)
def test_extraction(text, gold, correct):
    assert generation.is_correct(text, gold) is correct


def test_kinds():
    assert [generation.answer_kind(g) for g in ("C", "No", "-3.5", "1,000", "ending4", "blue sky")] == \
        ["letter", "yesno", "number", "number", "word", "text"]


def _greedy_reference(model, tokenizer, prompt: str, n: int) -> str:
    """Independent greedy decoding: n argmax steps over full forwards (no KV cache, no generate)."""
    from celora_dist.train.data import encode

    ids, start = encode(tokenizer, prompt, "", 128, eos=False)
    ids = ids[:start]
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            new.append(nxt)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_generate_eval_matches_independent_greedy_decoding(assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from celora_dist import CELoRAConfig, inject_celora
    from tests.train_utils import alpaca_rows

    tok = AutoTokenizer.from_pretrained(assets["model"])
    model = inject_celora(AutoModelForCausalLM.from_pretrained(assets["model"]), CELoRAConfig(r=4, alpha=8, r0=4),
                          verbose=False)
    prompts = [f"### Instruction:\n{r['instruction']}\n### Input:\n{r['input']}\n### Response:\n" for r in alpaca_rows(6)]
    refs = [_greedy_reference(model, tok, p, 4) for p in prompts]
    assert any(refs)
    # gold = the reference decode where it is non-empty: every one must match; a wrong gold never does
    records = [{"prompt": p, "answer": ref, "choices": [], "label": -1} for p, ref in zip(prompts, refs) if ref]
    got = generation.generate_eval(model, tok, records, 128, "cpu", max_new_tokens=4)
    assert got == {"gen_accuracy": 1.0, "gen_examples": len(records)}
    wrong = [{**r, "answer": "zzz qqq"} for r in records]
    assert generation.generate_eval(model, tok, wrong, 128, "cpu", max_new_tokens=4)["gen_accuracy"] == 0.0


def test_evaluations_report_progress_per_example(assets):
    """The watchdog (--dist-timeout) hears from a long evaluation after every example, so a big
    held-out set on a slow machine is not mistaken for a hung rank."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from celora_dist.train import evaluate
    from celora_dist.train.data import read_records

    tok = AutoTokenizer.from_pretrained(assets["model"])
    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    records = read_records(assets["mc"], "letter")[:5]
    calls = []
    evaluate.evaluate(model, tok, records, 64, "cpu", progress=lambda: calls.append("score"))
    generation.generate_eval(model, tok, records, 64, "cpu", max_new_tokens=2, progress=lambda: calls.append("gen"))
    assert calls == ["score"] * 5 + ["gen"] * 5
