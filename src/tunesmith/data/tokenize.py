"""Canonical rows -> token ids and labels, through the tokenizer's chat template.

Contract: ``labels[i] == input_ids[i]`` where the loss applies and ``IGNORE_INDEX`` elsewhere.
By default the loss covers every assistant reply of a row plus the end-of-turn EOS that follows
it, so the model learns to stop. The reply spans are found by rendering the conversation up to
each reply (with the generation prompt) and up to its end, and mapping those character spans to
tokens with the tokenizer's offsets; this works for any template whose renders of a shorter
conversation are prefixes of the longer one.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


UNLIMITED = 1 << 30  # a max_seq_len that cuts nothing


@dataclass
class TokenizedRow:
    input_ids: list[int]
    labels: list[int]
    length_before_truncation: int
    problems: list[tuple[str, str]] = field(default_factory=list)  # (field, message) errors

    @property
    def trainable_tokens(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


_SENTINEL = "\ue000{}\ue001"  # private-use characters: no real text or template contains them
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


_TURN_END: dict[tuple[int, str], str] = {}


def turn_end_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """The special token the chat template writes right after an assistant reply: the one the
    model must learn to emit and generation must stop at. EOS for most templates; ``<|eot_id|>``
    for Llama 3, ``<|im_end|>`` for ChatML on a base model whose EOS is another token."""
    key = (id(tokenizer), tokenizer.chat_template or "")
    if key not in _TURN_END:
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL.format(1)}]
        try:
            text = render(tokenizer, messages, generation_prompt=False)
            after = text[text.index(_SENTINEL.format(1)) + len(_SENTINEL.format(1)):]
        except Exception:  # a template that cannot render the probe: fall back to EOS
            after = ""
        specials = sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})),
                          key=len, reverse=True)
        _TURN_END[key] = next((t for t in specials if t and after.startswith(t)), tokenizer.eos_token)
    return _TURN_END[key]


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether encoding text puts BOS in front by itself (then a template's own BOS would be a second)."""
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def _with_eos(text: str, start: int, end: int, eos: str) -> tuple[int, int]:
    """Extend a reply span over the turn-end token the template writes right after it (if any)."""
    tail = text[end:end + len(eos) + 8]
    at = tail.find(eos)
    return (start, end + at + len(eos)) if at >= 0 and not tail[:at].strip() else (start, end)


def _marked(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [dict(m, content=_SENTINEL.format(i)) if m["role"] == "assistant" else m for i, m in enumerate(messages)]


def _spans_by_sentinel(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], full: str,
                       template: str | None = None) -> list[tuple[int, int]] | None:
    """Spans from a render with each reply replaced by a sentinel; None if the template alters replies."""
    if template is None:
        template = render(tokenizer, _marked(messages), generation_prompt=False)
    for transform in (str, str.strip):
        pieces, spans, cursor = [], [], 0
        for match in _SENTINEL_RE.finditer(template):
            pieces.append(template[cursor:match.start()])
            start = sum(len(p) for p in pieces)
            reply = transform(messages[int(match.group(1))]["content"])
            pieces.append(reply)
            spans.append((start, start + len(reply)))
            cursor = match.end()
        pieces.append(template[cursor:])
        if "".join(pieces) == full:
            return [_with_eos(full, s, e, turn_end_token(tokenizer)) for s, e in spans]
    return None


def _spans_by_prefix(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], full: str
                     ) -> list[tuple[int, int]]:
    """Render up to each reply (with the generation prompt) and up to its end; slower, more general."""
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
        spans.append(_with_eos(upto, start, start + len(reply), turn_end_token(tokenizer)))
    return spans


_PROBES = ("plain reply", "  padded reply \n", "<think>a</think>b", "line one\n\nline two", "{{ x }} {% y %}")
_SUBSTITUTION_SAFE: dict[tuple[int, str], bool] = {}


def substitution_safe(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the template writes assistant replies verbatim, whatever they hold.

    Checked once per tokenizer and template with probe replies (white space, think tags, Jinja-like
    text). When it holds, a conversation's text is its sentinel render with the replies put back,
    and the second render is skipped.
    """
    key = (id(tokenizer), tokenizer.chat_template or "")
    if key not in _SUBSTITUTION_SAFE:
        safe = True
        for probe in _PROBES:
            messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe},
                        {"role": "user", "content": "r"}, {"role": "assistant", "content": probe}]
            full = render(tokenizer, messages, generation_prompt=False)
            template = render(tokenizer, _marked(messages), generation_prompt=False)
            safe &= _SENTINEL_RE.sub(lambda m: messages[int(m.group(1))]["content"], template) == full  # noqa: B023
        _SUBSTITUTION_SAFE[key] = safe
    return _SUBSTITUTION_SAFE[key]


def assistant_char_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
                         full: str | None = None, template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, per assistant turn, the character span of reply + EOS.

    ``full`` and ``template`` (the render with sentinels) may be passed in when rendered in a batch.
    """
    full = render(tokenizer, messages, generation_prompt=False) if full is None else full
    spans = _spans_by_sentinel(tokenizer, messages, full, template)
    return full, spans if spans is not None else _spans_by_prefix(tokenizer, messages, full)


def _labelled(tokenizer: PreTrainedTokenizerBase, full: str, spans: list[tuple[int, int]], ids: list[int],
              offsets: list[tuple[int, int]], ends_with_reply: bool, max_seq_len: int, train_on_prompt: bool
              ) -> TokenizedRow:
    if train_on_prompt:
        labels = list(ids)
    else:
        # Offsets are sorted, so the tokens overlapping a span are one contiguous run: two bisections.
        labels = [IGNORE_INDEX] * len(ids)
        for s_start, s_end in spans:
            first = bisect.bisect_right(offsets, s_start, key=lambda o: o[1])
            last = bisect.bisect_left(offsets, s_end, key=lambda o: o[0])
            labels[first:last] = ids[first:last]
    # A template that writes nothing after the final reply: append EOS so the model learns to stop.
    if spans and ends_with_reply and not full[: spans[-1][1]].endswith((turn_end_token(tokenizer),
                                                                        tokenizer.eos_token)):
        ids = ids + [tokenizer.eos_token_id]
        labels.append(tokenizer.eos_token_id)
    return _truncated(ids, labels, max_seq_len)


def _encode_with_offsets(tokenizer: PreTrainedTokenizerBase, texts: list[str]
                         ) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) per text, without special tokens. Calls the Rust backend directly
    when there is one: transformers' wrapper converts every encoding to Python lists first."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    encoding = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(encoding["input_ids"], encoding["offset_mapping"]))


def tokenize_conversations(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, str]]],
                           max_seq_len: int, train_on_prompt: bool = False) -> list[TokenizedRow | ValueError]:
    """Token ids and labels for many chat rows at once (batched rendering and tokenizer calls).

    A template that raises on some row (``raise_exception``) is retried row by row, so that only
    that row is reported, with the template's message.
    """
    try:
        return _tokenize_batch(tokenizer, conversations, max_seq_len, train_on_prompt)
    except Exception:
        results: list[TokenizedRow | ValueError] = []
        for messages in conversations:
            try:
                results += _tokenize_batch(tokenizer, [messages], max_seq_len, train_on_prompt)
            except Exception as err:
                results.append(ValueError(f"the chat template refused this row: {err}"))
        return results


def _tokenize_batch(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, str]]],
                    max_seq_len: int, train_on_prompt: bool) -> list[TokenizedRow | ValueError]:
    # One batched render of the sentinel versions, and of the conversations themselves unless the
    # template is known to write replies verbatim (then the text is the sentinel render filled in).
    templates = tokenizer.apply_chat_template([_marked(m) for m in conversations], tokenize=False) \
        if conversations else []
    if conversations and substitution_safe(tokenizer):
        fulls = [_SENTINEL_RE.sub(lambda m, c=c: c[int(m.group(1))]["content"], t)
                 for c, t in zip(conversations, templates)]
    else:
        fulls = tokenizer.apply_chat_template(conversations, tokenize=False) if conversations else []
    rendered: list[tuple[str, list[tuple[int, int]]] | ValueError] = []
    for messages, full, template in zip(conversations, fulls, templates):
        try:
            rendered.append(assistant_char_spans(tokenizer, messages, full, template))
        except ValueError as err:
            rendered.append(err)
    texts = [r[0] for r in rendered if not isinstance(r, ValueError)]
    encoded = _encode_with_offsets(tokenizer, texts)
    results: list[TokenizedRow | ValueError] = []
    index = 0
    for messages, item in zip(conversations, rendered):
        if isinstance(item, ValueError):
            results.append(item)
            continue
        full, spans = item
        ids, offsets = encoded[index]
        results.append(_labelled(tokenizer, full, spans, ids, offsets, messages[-1]["role"] == "assistant",
                                 max_seq_len, train_on_prompt))
        index += 1
    return results


def tokenize_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], max_seq_len: int,
                      train_on_prompt: bool = False) -> TokenizedRow:
    """Token ids and labels for one chat row, truncated on the right to ``max_seq_len``."""
    [result] = tokenize_conversations(tokenizer, [messages], max_seq_len, train_on_prompt)
    if isinstance(result, ValueError):
        raise result
    return result


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


def tokenize_rows_batched(tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], max_seq_len: int,
                          train_on_prompt: bool = False) -> list[TokenizedRow | ValueError]:
    """``tokenize_row`` for many canonical rows, chat rows through one batched tokenizer call."""
    chat = [i for i, row in enumerate(rows) if "messages" in row]
    results: list[TokenizedRow | ValueError] = [None] * len(rows)  # type: ignore[list-item]
    for i, result in zip(chat, tokenize_conversations(tokenizer, [rows[i]["messages"] for i in chat], max_seq_len,
                                                      train_on_prompt)):
        results[i] = result
    for i, row in enumerate(rows):
        if "messages" not in row:
            results[i] = tokenize_text(tokenizer, row["text"], max_seq_len)
    return results


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], prefill: str = ""
                  ) -> torch.Tensor:
    """Token ids of the conversation plus the assistant generation prompt (and the start of the reply,
    ``prefill``), rendered as in training."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, seq)
