"""Canonical rows -> token ids and labels, through the tokenizer's chat template.

Contract: ``labels[i] == input_ids[i]`` where the loss applies and ``IGNORE_INDEX`` elsewhere.
By default the loss covers every assistant reply of a row plus the end-of-turn EOS that follows
it, so the model learns to stop. The reply spans are found by rendering the conversation up to
each reply (with the generation prompt) and up to its end, and mapping those character spans to
tokens with the tokenizer's offsets; this works for any template whose renders of a shorter
conversation are prefixes of the longer one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass
class TokenizedRow:
    input_ids: list[int]
    labels: list[int]
    length_before_truncation: int
    problems: list[tuple[str, str]] = field(default_factory=list)  # (field, message) errors

    @property
    def trainable_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_char_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, per assistant turn, the character span of reply + EOS."""
    full = render(tokenizer, messages, generation_prompt=False)
    eos = tokenizer.eos_token
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:index], generation_prompt=True)
        upto = render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation; "
                             "set model.chat_template to one that does")
        reply = message["content"].strip()
        start = upto.find(reply, len(prefix))
        if start < 0:
            raise ValueError("the chat template changes the assistant text beyond trimming; "
                             "set model.chat_template to one that keeps it")
        end = start + len(reply)
        # The EOS the template writes after the reply belongs to the trained span.
        tail = upto[end:]
        eos_at = tail.find(eos)
        if eos_at >= 0 and not tail[:eos_at].strip():
            end += eos_at + len(eos)
        spans.append((start, end))
    return full, spans


def tokenize_messages(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    max_seq_len: int,
    train_on_prompt: bool = False,
) -> TokenizedRow:
    """Token ids and labels for one chat row, truncated on the right to ``max_seq_len``."""
    full, spans = assistant_char_spans(tokenizer, messages)
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoding["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for position, (start, end) in enumerate(encoding["offset_mapping"]):
        if train_on_prompt or any(start < s_end and end > s_start for s_start, s_end in spans):
            labels[position] = ids[position]
    # A template that writes no EOS after the final reply: append one so the model learns to stop.
    if spans and not full[: spans[-1][1]].endswith(tokenizer.eos_token) and messages[-1]["role"] == "assistant":
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return _truncated(ids, labels, max_seq_len)


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str, max_seq_len: int) -> TokenizedRow:
    """Raw text: every token is trained on, and EOS closes the document."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return _truncated(ids, list(ids), max_seq_len)


def _truncated(ids: list[int], labels: list[int], max_seq_len: int) -> TokenizedRow:
    row = TokenizedRow(ids[:max_seq_len], labels[:max_seq_len], len(ids))
    if row.trainable_tokens == 0:
        cut = f" after truncation to {max_seq_len} tokens (the row has {len(ids)} tokens)" if len(ids) > max_seq_len else ""
        row.problems.append(("labels", f"row has no trainable token{cut}; raise data.max_seq_len, shorten the "
                                       "prompt, or set data.empty_labels: drop"))
    return row


def tokenize_row(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], max_seq_len: int,
                 train_on_prompt: bool = False) -> TokenizedRow:
    if "messages" in row:
        return tokenize_messages(tokenizer, row["messages"], max_seq_len, train_on_prompt)
    return tokenize_text(tokenizer, row["text"], max_seq_len)
