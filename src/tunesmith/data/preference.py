"""Preference data -> canonical preference rows ``{"prompt": [messages], "chosen": str, "rejected": str}``,
or unpaired rows ``{"prompt": [messages], "completion": str, "desirable": bool}`` (for KTO).

Three pair formats: explicit ``prompt``/``chosen``/``rejected`` (strings or chat messages),
OpenAI's preference format (``input.messages``, ``preferred_output``, ``non_preferred_output``)
and Anthropic HH transcripts (``chosen``/``rejected`` strings of ``\\n\\nHuman:`` /
``\\n\\nAssistant:`` turns that share every turn but the last). Unpaired rows are TRL's
``prompt``/``completion``/``label`` (``desirable`` is taken for ``label``).
"""

from __future__ import annotations

import re
from typing import Any

from tunesmith.data.turns import Problem, check_turn_order

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
    """Split an HH transcript into chat messages.

    >>> parse_hh_transcript("\\n\\nHuman: Hi there\\n\\nAssistant: Hello!")
    [{'role': 'user', 'content': 'Hi there'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError("text before the first '\\n\\nHuman:' turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]


def _reply_text(value: Any, field: str, problems: list[Problem]) -> str | None:
    """A reply given as a string, or as messages ending with an assistant turn."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant" \
            and isinstance(value[-1].get("content"), str):
        return value[-1]["content"]
    problems.append(Problem(field, "must be a string or a list of messages ending with an assistant message"))
    return None


def _prompt_messages(value: Any, field: str, problems: list[Problem]) -> list[dict[str, str]] | None:
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value.strip() else None
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                       and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    problems.append(Problem(field, "must be a string or a list of {role, content} messages"))
    return None


def _check_prompt(prompt: list[dict[str, str]], field: str) -> list[Problem]:
    if not prompt:
        return [Problem(field, "the prompt is empty")]
    if prompt[-1]["role"] != "user":
        return [Problem(field, f"the prompt must end with a user turn, not {prompt[-1]['role']!r}")]
    order = check_turn_order(prompt + [{"role": "assistant", "content": "x"}], field)
    return [p for p in order if p.severity == "error"]


def _unpaired(row: dict[str, Any]) -> tuple[dict[str, Any] | None, list[Problem]]:
    problems: list[Problem] = []
    flag = "label" if "label" in row else "desirable"
    if "label" in row and "desirable" in row:
        problems.append(Problem("desirable", "give the flag once: label or desirable, not both"))
    elif not isinstance(row.get(flag), bool):
        problems.append(Problem(flag, f"must be true (a desirable reply) or false (an undesirable one), not "
                                      f"{row.get(flag)!r}"))
    if "prompt" not in row:
        return None, problems + [Problem("prompt", "missing")]
    prompt = _prompt_messages(row["prompt"], "prompt", problems)
    completion = _reply_text(row.get("completion"), "completion", problems)
    if prompt is not None:
        problems += _check_prompt(prompt, "prompt")
    elif not any(p.field == "prompt" for p in problems):
        problems.append(Problem("prompt", "missing or empty"))
    if completion is not None and not completion.strip():
        problems.append(Problem("completion", "the reply is empty or whitespace only"))
    if problems:
        return None, problems
    return {"prompt": prompt, "completion": completion, "desirable": row[flag]}, problems


def _finish(prompt: list[dict[str, str]] | None, chosen: str | None, rejected: str | None, prompt_field: str,
            problems: list[Problem]) -> tuple[dict[str, Any] | None, list[Problem]]:
    if prompt is not None:
        problems += _check_prompt(prompt, prompt_field)
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if text is not None and not text.strip():
            problems.append(Problem(name, "the reply is empty or whitespace only"))
    if chosen is not None and rejected is not None and chosen.strip() == rejected.strip() and chosen.strip():
        problems.append(Problem("rejected", "chosen and rejected are identical: the pair teaches nothing; drop it"))
    if problems or prompt is None or chosen is None or rejected is None:
        if prompt is None and not any(p.field == prompt_field for p in problems):
            problems.append(Problem(prompt_field, "missing or empty"))
        return None, problems
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, problems


def preference_to_canonical(row: dict[str, Any], fmt: str) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Convert one preference row; problems name the field.

    >>> preference_to_canonical({"prompt": "2+2?", "chosen": "4", "rejected": "4"}, "preference")[1][0].message
    'chosen and rejected are identical: the pair teaches nothing; drop it'
    """
    problems: list[Problem] = []
    if fmt == "unpaired":
        return _unpaired(row)
    if fmt == "preference":
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            return None, [Problem(k, "missing") for k in missing]
        prompt = _prompt_messages(row["prompt"], "prompt", problems)
        chosen = _reply_text(row["chosen"], "chosen", problems)
        rejected = _reply_text(row["rejected"], "rejected", problems)
        return _finish(prompt, chosen, rejected, "prompt", problems)
    if fmt == "openai_preference":
        source = row.get("input")
        if not isinstance(source, dict) or "messages" not in source:
            return None, [Problem("input.messages", "missing (OpenAI preference rows hold input.messages)")]
        prompt = _prompt_messages(source["messages"], "input.messages", problems)
        chosen = _reply_text(row.get("preferred_output"), "preferred_output", problems)
        rejected = _reply_text(row.get("non_preferred_output"), "non_preferred_output", problems)
        return _finish(prompt, chosen, rejected, "input.messages", problems)
    if fmt == "hh":
        conversations = {}
        for name in ("chosen", "rejected"):
            if not isinstance(row.get(name), str):
                problems.append(Problem(name, "must be a Human/Assistant transcript string"))
                continue
            try:
                conversations[name] = parse_hh_transcript(row[name])
            except ValueError as err:
                problems.append(Problem(name, str(err)))
                continue
            if not conversations[name] or conversations[name][-1]["role"] != "assistant":
                problems.append(Problem(name, "the transcript must end with an '\\n\\nAssistant:' turn"))
        if problems:
            return None, problems
        chosen_turns, rejected_turns = conversations["chosen"], conversations["rejected"]
        if chosen_turns[:-1] != rejected_turns[:-1]:
            return None, [Problem("rejected", "chosen and rejected transcripts differ before their last turn; "
                                              "they must share the conversation and differ only in the reply")]
        return _finish(chosen_turns[:-1], chosen_turns[-1]["content"], rejected_turns[-1]["content"], "chosen",
                       problems)
    raise ValueError(f"unknown preference format {fmt!r}")


def sides(row: dict[str, Any]) -> tuple[str, ...]:
    """The replies a canonical row holds: a pair's two, an unpaired row's one, a chat row's none."""
    return ("chosen", "rejected") if "chosen" in row else ("completion",) if "completion" in row else ()


def as_chat(row: dict[str, Any], side: str | None = None) -> dict[str, Any]:
    """A canonical row as a chat row: a preference pair becomes its prompt + the ``side`` reply
    (default: the chosen one), an unpaired row its prompt + its completion.

    >>> as_chat({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}, "rejected")
    {'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'b'}]}
    """
    if "prompt" not in row:
        return row
    return {"messages": row["prompt"] + [{"role": "assistant", "content": row[side or sides(row)[0]]}]}
