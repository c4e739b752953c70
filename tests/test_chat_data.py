"""Chat data (messages / ShareGPT conversations) and the other ways in (parquet, save_to_disk,
several --data sources): tokenization and masks against hand-built expectations, and one
training run of launch/train.py on chat data."""
from __future__ import annotations

import json

import pytest

from celora_dist.train import chat, data
from celora_dist.train.errors import UsageError

from .train_utils import TINY_FLAGS, read_metrics, run_train, show

TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} "
            "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "repeat red"},
                {"role": "assistant", "content": "red red"}, {"role": "user", "content": "repeat blue"},
                {"role": "assistant", "content": "blue blue"}]


@pytest.fixture
def tokenizer(assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["model"])
    tok.chat_template = TEMPLATE
    return tok


def test_loss_only_on_assistant_turns(tokenizer):
    ids, labels = chat.chat_ids(tokenizer, CONVERSATION, 512)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    whole = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert ids == tokenizer(whole, add_special_tokens=False)["input_ids"]  # every turn, system prompt kept
    assert labels[:6] == [-100] * 6
    trained = [t for t, label in zip(tokens, labels) if label != -100]
    # both assistant turns with their end-of-turn marker; no system/user token
    assert trained == ["red", "red", "</s>", "blue", "blue", "</s>"]
    assert all(label in (-100, i) for i, label in zip(ids, labels))
    cut_ids, cut_labels = chat.chat_ids(tokenizer, CONVERSATION, 12)  # truncation keeps the start
    assert cut_ids == ids[:12] and cut_labels == labels[:12]


def test_sharegpt_equals_messages_and_bad_rows_are_named():
    sharegpt = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(t["role"], t["role"]),
                                   "value": t["content"]} for t in CONVERSATION]}
    assert data.to_record(sharegpt, "x")["messages"] == data.to_record({"messages": CONVERSATION}, "x")["messages"]
    with pytest.raises(UsageError, match="f.jsonl: line 3: no assistant turn"):
        data.to_record({"messages": CONVERSATION[:2]}, "f.jsonl: line 3")
    with pytest.raises(UsageError, match="turn 1 needs string 'role' and 'content'"):
        data.to_record({"messages": [CONVERSATION[0], {"role": "user"}]}, "f")


def test_template_problems_are_usage_errors(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(UsageError, match="--chat-template FILE"):
        chat.use_template(tokenizer, None)
    # a template whose render of the first turns is not a prefix of the whole conversation's
    tokenizer.chat_template = "{{ messages | length }} " + TEMPLATE
    with pytest.raises(UsageError, match="prefix-consistent"):
        chat.chat_ids(tokenizer, CONVERSATION, 512)


def test_parquet_save_to_disk_and_several_sources(assets, tmp_path):
    from datasets import Dataset

    rows = [json.loads(line) for line in assets["mc"].read_text().splitlines()[:30]]
    Dataset.from_list(rows[10:20]).to_parquet(str(tmp_path / "part.parquet"))
    Dataset.from_list(rows[20:30]).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "head.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    train, held, about = data.file_task([tmp_path / "head.jsonl", tmp_path / "part.parquet", tmp_path / "saved"],
                                        assets["mc"], 0.1)
    assert train == data.read_records(assets["mc"])[:30]  # same records, same order, whatever the container
    assert "head.jsonl + part.parquet + saved" in about
    (tmp_path / "junk").mkdir()
    with pytest.raises(UsageError, match="junk: not a readable folder saved by datasets' save_to_disk"):
        data.read_records(tmp_path / "junk")


def test_train_on_chat_data(assets, tmp_path):
    from tests.train_utils import alpaca_rows

    rows = [{"messages": [{"role": "system", "content": "repeat the last word twice"},
                          {"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]}]}
            for r in alpaca_rows(200)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "template.jinja").write_text(TEMPLATE)
    out = tmp_path / "out"
    proc = run_train(["--model", str(assets["model"]), "--data", str(tmp_path / "chat.jsonl"), *TINY_FLAGS,
                      "--chat-template", str(tmp_path / "template.jinja"), "--max-steps", "30", "--micro-batch", "8",
                      "--refresh-every", "10", "--output-dir", str(out), "--zero-shot"])
    assert proc.returncode == 0, show(proc)
    evals = [r for r in read_metrics(out) if "eval" in r]
    first, last = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    assert last < 0.7 * first, (first, last)  # the held-out assistant-token loss falls
