"""Chat records: ``messages`` (role/content) or ShareGPT ``conversations`` (from/value), rendered
with the tokenizer's own chat template, loss on the assistant turns only.

The assistant tokens are found without template-specific markers: the conversation is
rendered once, each assistant turn's character span is where the render of the turns
before it (with the generation prompt) ends and the render including it ends, and the
tokens whose characters start inside a span carry labels. That needs a template whose
render of a prefix of the conversation is a prefix of the full render — true of the
chat templates of LLaMA, Qwen, Mistral, Gemma and SmolLM; one that is not gets a clear
error rather than wrong masks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UsageError

IGNORE = -100
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def is_chat(row: Any) -> bool:
    return isinstance(row, dict) and ("messages" in row or "conversations" in row)


def messages_of(row: dict, where: str) -> list[dict[str, str]]:
    """The conversation as [{role, content}] with roles system/user/assistant; UsageError naming ``where``."""
    sharegpt = "messages" not in row
    turns = row["conversations"] if sharegpt else row["messages"]
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    if not isinstance(turns, list) or not turns:
        raise UsageError(f"{where}: '{'conversations' if sharegpt else 'messages'}' must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str) \
                or not isinstance(turn.get(text_key), str):
            raise UsageError(f"{where}: turn {i} needs string '{role_key}' and '{text_key}' fields, got {turn!r:.80}")
        role = ROLES.get(turn[role_key].lower())
        if role is None:
            raise UsageError(f"{where}: turn {i} has role {turn[role_key]!r}; known roles are {sorted(ROLES)}")
        out.append({"role": role, "content": turn[text_key]})
    if not any(t["role"] == "assistant" for t in out):
        raise UsageError(f"{where}: no assistant turn, so nothing to train on")
    return out


def use_template(tokenizer, template_file: str | Path | None) -> None:
    """Install ``template_file`` (Jinja) as the chat template; without one the model's own must exist."""
    if template_file is not None:
        path = Path(template_file)
        if not path.is_file():
            raise UsageError(f"--chat-template {template_file}: no such file")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("the data has chat records (messages/conversations) but the model's tokenizer has no "
                         "chat template; give one with --chat-template FILE (a Jinja template)")
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError("chat records need a fast tokenizer (character offsets mark the assistant tokens)")


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(full render, character spans of the assistant turns)."""
    full = _render(tokenizer, messages)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before, upto = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[:i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise UsageError("the chat template renders a conversation's first turns differently from the whole "
                             "conversation, so assistant tokens cannot be located; pass a prefix-consistent "
                             "template with --chat-template FILE")
        spans.append((len(before), len(upto)))
    return full, spans


def chat_ids(tokenizer, messages: list[dict], seq_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are the ids on assistant tokens (their end-of-turn markers
    included), -100 elsewhere; cut to ``seq_len`` tokens from the start."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:seq_len]
    labels = [tok if any(a <= start < b for a, b in spans) else IGNORE
              for tok, (start, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels
