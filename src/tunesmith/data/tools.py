"""Tool calls in generated text, read with the chat template's own syntax.

A template supports tools when rendering with ``tools=`` writes them into the prompt and an assistant
turn's ``tool_calls`` are written with JSON arguments. The call syntax is read off the template: an
assistant turn calling a sentinel function is rendered, and the text around the name and around the
arguments object is the syntax (``<tool_call>\\n{"name": "`` NAME ``", "arguments": `` ARGS
``}\\n</tool_call>`` for Hermes and Qwen templates; ``{"name": "`` NAME ``", "parameters": `` ARGS
``}`` for Llama 3.1). Shared by serving (OpenAI's ``tool_calls``) and multi-turn rollouts (an
environment's tools), so it lives beside the data.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from tunesmith.data.tokenize import turn_end_token

_NAME, _KEY, _VALUE = "tunesmith_probe_fn", "tunesmith_probe_key", "tunesmith_probe_value"  # in no template
_PROBE_TOOL = {"type": "function", "function": {"name": _NAME, "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}


@dataclass(frozen=True)
class CallSyntax:
    """How the template writes one tool call: before_name NAME after_name ARGUMENTS after_arguments."""

    before_name: str
    after_name: str
    after_arguments: str

    def opening(self, name: str) -> str:
        """The text of a call to ``name`` up to its arguments object."""
        return self.before_name + name + self.after_name


_SYNTAX: dict[tuple[int, str], CallSyntax | None] = {}


def call_syntax(tokenizer: PreTrainedTokenizerBase) -> CallSyntax | None:
    """The template's tool-call syntax; None when it has no tool support (it ignores ``tools``, or
    does not write a call's arguments as a JSON object). Read once per tokenizer and template."""
    key = (id(tokenizer), tokenizer.chat_template or "")
    if key not in _SYNTAX:
        try:
            _SYNTAX[key] = _read_syntax(tokenizer)
        except Exception:  # a template that cannot render the probe has no usable tool support
            _SYNTAX[key] = None
    return _SYNTAX[key]


def _read_syntax(tokenizer: PreTrainedTokenizerBase) -> CallSyntax | None:
    question = [{"role": "user", "content": "q"}]
    prompt = tokenizer.apply_chat_template(question, tools=[_PROBE_TOOL], tokenize=False, add_generation_prompt=True)
    if _NAME not in prompt:
        return None
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": _NAME, "arguments": {_KEY: _VALUE}}}]}
    full = tokenizer.apply_chat_template([*question, call], tools=[_PROBE_TOOL], tokenize=False)
    if not full.startswith(prompt):
        return None
    turn = full[len(prompt):]
    turn = turn[:turn.find(turn_end_token(tokenizer))] if turn_end_token(tokenizer) in turn else turn
    name_at, key_at = turn.find(_NAME), turn.find(json.dumps(_KEY))
    opening = turn.rfind("{", name_at, key_at)
    closing = turn.find("}", turn.find(json.dumps(_VALUE), key_at)) + 1
    if min(name_at, key_at, opening, closing - 1) < 0 or json.loads(turn[opening:closing]) != {_KEY: _VALUE}:
        return None
    return CallSyntax(turn[:name_at].lstrip(), turn[name_at + len(_NAME):opening], turn[closing:].rstrip())


def parse_calls(text: str, syntax: CallSyntax) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, OpenAI tool_calls) from generated text: every well-formed call, in order; the
    content is the text before the first call, without the whitespace that ends it (None when empty).

    >>> syntax = CallSyntax('<tool_call>{"name": "', '", "arguments": ', '}</tool_call>')
    >>> content, calls = parse_calls('Sure. <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>', syntax)
    >>> content, calls[0]["function"]
    ('Sure.', {'name': 'f', 'arguments': '{"x": 1}'})
    """
    calls, first, cursor, decoder = [], None, 0, json.JSONDecoder()
    while (start := text.find(syntax.before_name, cursor)) >= 0:
        name_at = start + len(syntax.before_name)
        name_end = text.find(syntax.after_name, name_at)
        if name_end < 0:
            break
        try:
            arguments, end = decoder.raw_decode(text, name_end + len(syntax.after_name))
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python parses
            break
        if not isinstance(arguments, dict) or not text.startswith(syntax.after_arguments, end):
            break
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": text[name_at:name_end], "arguments": json.dumps(arguments)}})
        first = start if first is None else first
        cursor = end + len(syntax.after_arguments)
    content = text[:first] if calls else text
    return (content.rstrip() or None) if calls else content, calls


# The call syntax of Hermes-style templates, used where a template has no tool support of its own.
HERMES = CallSyntax('<tool_call>\n{"name": "', '", "arguments": ', '}\n</tool_call>')
