"""Tool calling through the chat template's own tool support (its call syntax is read off the template
in ``data/tools.py``). Generated text is parsed into OpenAI's ``tool_calls`` with that syntax, and a
required or named ``tool_choice`` is enforced by a grammar of it (``structured.py``).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tunesmith.data.tools import CallSyntax, call_syntax, parse_calls  # noqa: F401  (the server's names for them)


def template_messages(messages: list[dict[str, Any]], raw: list[Any]) -> list[dict[str, Any]]:
    """The messages with their tool calls (arguments as objects, as templates take them) and tool
    call ids. ValueError naming the field when a call's arguments are not a JSON object."""
    out = []
    for i, (message, original) in enumerate(zip(messages, raw)):
        message = dict(message)
        if original.tool_call_id is not None:
            message["tool_call_id"] = original.tool_call_id
        calls = []
        for j, call in enumerate(original.tool_calls or []):
            try:
                arguments = json.loads(call.function.arguments)
            except (ValueError, RecursionError):  # RecursionError: arguments nested deeper than Python parses
                arguments = None
            if not isinstance(arguments, dict):
                raise ValueError(f"messages[{i}].tool_calls[{j}].function.arguments")
            calls.append({"id": call.id, "type": "function",
                          "function": {"name": call.function.name, "arguments": arguments}})
        if calls:
            message["tool_calls"] = calls
        out.append(message)
    return out


def encode_with_tools(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]],
                      tools: list[dict[str, Any]]) -> torch.Tensor:
    """Token ids (1, seq) of the conversation, the tools described by the template, and the
    generation prompt."""
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


