"""Row formats -> canonical rows, with a check of each row's structure.

Canonical rows are ``{"messages": [{"role": ..., "content": ...}, ...]}`` for chat data and
``{"text": ...}`` for raw text. Every problem names the field it is about, so the caller can
report ``file:line: field: message``.
"""

from __future__ import annotations

from typing import Any

from tunesmith.config.names import CHAT_FORMATS, FORMATS, PREFERENCE_FORMATS  # noqa: F401  (re-exported)
from tunesmith.data.preference import preference_to_canonical
from tunesmith.data.turns import Problem, check_turn_order

# Two-field formats: (user field, assistant field).
PAIR_FIELDS = {"qa": ("question", "answer"), "completion": ("prompt", "completion")}
ROLES = ("system", "user", "assistant")
# Keys a turn may carry besides its role and text (metadata the formats define); others are warned about.
TURN_KEYS = {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "from", "value"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "model": "assistant"}


def detect_format(row: Any) -> str | None:
    """The format a row is written in, judged by its keys.

    >>> detect_format({"messages": []}), detect_format({"instruction": "a", "output": "b"})
    ('openai', 'alpaca')
    >>> detect_format({"conversations": []}), detect_format({"text": "x"}), detect_format({"q": 1})
    ('sharegpt', 'text', None)
    >>> detect_format({"chosen": "", "rejected": ""}), detect_format({"prompt": "", "chosen": "", "rejected": ""})
    ('hh', 'preference')
    >>> detect_format({"prompt": "", "completion": "", "label": True}), detect_format({"prompt": "", "completion": ""})
    ('unpaired', 'completion')
    """
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "openai"
    if "conversations" in row:
        return "sharegpt"
    if "input" in row and ("preferred_output" in row or "non_preferred_output" in row):
        return "openai_preference"
    if "chosen" in row or "rejected" in row:
        return "preference" if "prompt" in row else "hh"
    # A string label (a classification dataset's) is not KTO's flag: such rows stay prompt/completion.
    if "completion" in row and ("desirable" in row or isinstance(row.get("label"), bool)):
        return "unpaired"
    if "instances" in row and "instruction" in row:
        return "seed_tasks"
    if "question" in row and "answer" in row:
        return "qa"
    if "prompt" in row and "completion" in row:
        return "completion"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    return None


def repeated_unit(text: str, min_length: int = 200, min_repeats: int = 10) -> tuple[str, int] | None:
    """If ``text`` is one short string repeated many times, return (that string, count).

    >>> repeated_unit("Eat a banana!" * 100)
    ('Eat a banana!', 100)
    >>> repeated_unit("A normal reply. " * 2) is None
    True
    """
    if len(text) < min_length:
        return None
    period = (text + text).find(text, 1)
    if period < len(text) and len(text) % period == 0 and len(text) // period >= min_repeats:
        return text[:period], len(text) // period
    return None


def _content_text(content: Any, field: str, problems: list[Problem]) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    problems.append(Problem(field, f"content must be a string (or a list of text parts), got {type(content).__name__}"))
    return None


def _check_replies(messages: list[dict[str, str]], prefix: str, own_field: str | None = None) -> list[Problem]:
    """Empty and looping replies. ``own_field`` names the reply's field in two-field formats."""
    problems = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        field = own_field or f"{prefix}[{index}].content"
        if not message["content"].strip():
            problems.append(Problem(field, "assistant reply is empty or whitespace only; write the reply or drop the row"))
        elif (unit := repeated_unit(message["content"])) is not None:
            problems.append(Problem(field, f"assistant reply is {unit[0]!r} repeated {unit[1]} times "
                                           f"({len(message['content'])} characters); likely a generation loop",
                                    "warning"))
    return problems


def _turn_problem(turn: Any, field: str, role_key: str, text_key: str, role_map: dict[str, str]) -> Problem:
    """Why one turn could not be read (only called for a bad turn)."""
    if not isinstance(turn, dict):
        return Problem(field, f"a turn must be an object with {role_key!r} and {text_key!r}")
    if role_key not in turn:
        return Problem(f"{field}.{role_key}", "missing")
    if str(turn[role_key]).lower() not in role_map:
        return Problem(f"{field}.{role_key}", f"unknown role {turn[role_key]!r}; use one of {', '.join(sorted(role_map))}")
    return Problem(f"{field}.{text_key}", "missing")


def _messages_from_list(raw: Any, prefix: str, role_key: str, text_key: str,
                        role_map: dict[str, str]) -> tuple[list[dict[str, str]] | None, list[Problem]]:
    if not isinstance(raw, list) or not raw:
        return None, [Problem(prefix, "must be a non-empty list of turns")]
    problems: list[Problem] = []
    messages = []
    for index, turn in enumerate(raw):
        role = role_map.get(turn.get(role_key)) if isinstance(turn, dict) else None  # fast path: exact role names
        if role is None and isinstance(turn, dict) and isinstance(turn.get(role_key), str):
            role = role_map.get(turn[role_key].lower())
        if role is None or text_key not in turn:
            problems.append(_turn_problem(turn, f"{prefix}[{index}]", role_key, text_key, role_map))
            continue
        if len(turn) > 2 and not turn.keys() <= TURN_KEYS:
            unknown = ", ".join(sorted(map(repr, turn.keys() - TURN_KEYS)))
            problems.append(Problem(f"{prefix}[{index}]", f"unknown field(s) {unknown}; they are ignored", "warning"))
        content = turn[text_key]
        if not isinstance(content, str):
            content = _content_text(content, f"{prefix}[{index}].{text_key}", problems)
            if content is None:
                continue
        messages.append({"role": role, "content": content})
    if any(p.severity == "error" for p in problems):
        return None, problems
    return messages, problems + check_turn_order(messages, prefix) + _check_replies(messages, prefix)


def _alpaca_messages(row: dict[str, Any]) -> tuple[list[dict[str, str]] | None, list[Problem]]:
    problems = []
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            problems.append(Problem(key, "missing" if key not in row else f"must be a string, got {type(row[key]).__name__}"))
        elif not row[key].strip():
            problems.append(Problem(key, "is empty; fill it in or drop the row"))
    for key in ("input", "system"):
        if row.get(key) is not None and not isinstance(row[key], str):
            problems.append(Problem(key, f"must be a string, got {type(row[key]).__name__}"))
    if problems:
        return None, problems
    prompt = row["instruction"] + (f"\n\n{row['input']}" if (row.get("input") or "").strip() else "")
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return messages, _check_replies(messages, "output", own_field="output")


def to_canonical(row: Any, fmt: str) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Convert one row of format ``fmt`` to a canonical row, or say why it cannot be.

    >>> to_canonical({"instruction": "Add", "input": "1+1", "output": "2"}, "alpaca")[0]["messages"][0]
    {'role': 'user', 'content': 'Add\\n\\n1+1'}
    >>> to_canonical({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]},
    ...              "sharegpt")[1][0].message
    "unknown role 'bot'; use one of assistant, chatgpt, gpt, human, model, system, user"
    """
    if not isinstance(row, dict):
        return None, [Problem("row", f"must be a JSON object, got {type(row).__name__}")]
    if fmt == "openai":
        if "messages" not in row:
            return None, [Problem("messages", "missing (the file is in OpenAI chat format)")]
        messages, problems = _messages_from_list(row["messages"], "messages", "role", "content",
                                                 {r: r for r in ROLES})
    elif fmt == "sharegpt":
        if "conversations" not in row:
            return None, [Problem("conversations", "missing (the file is in ShareGPT format)")]
        messages, problems = _messages_from_list(row["conversations"], "conversations", "from", "value",
                                                 SHAREGPT_ROLES)
    elif fmt == "alpaca":
        messages, problems = _alpaca_messages(row)
    elif fmt == "seed_tasks":
        instances = row.get("instances")
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            return None, [Problem("instances", "must be a non-empty list of {input, output}")]
        first = instances[0]
        messages, problems = _alpaca_messages({"instruction": row.get("instruction"),
                                               "input": first.get("input") or "", "output": first.get("output")})
        problems = [Problem(f"instances[0].{p.field}" if p.field in ("input", "output") else p.field, p.message,
                            p.severity) for p in problems]
        if len(instances) > 1:
            problems.append(Problem("instances", f"{len(instances)} instances; only the first is used", "warning"))
    elif fmt in PAIR_FIELDS:
        user_key, reply_key = PAIR_FIELDS[fmt]
        problems = [Problem(k, "missing or not a non-empty string") for k in (user_key, reply_key)
                    if not isinstance(row.get(k), str) or not row[k].strip()]
        if problems:
            return None, problems
        messages = [{"role": "user", "content": row[user_key]}, {"role": "assistant", "content": row[reply_key]}]
        problems = _check_replies(messages, reply_key, own_field=reply_key)
    elif fmt in PREFERENCE_FORMATS:

        return preference_to_canonical(row, fmt)
    elif fmt == "text":
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            return None, [Problem("text", "missing or empty")]
        return {"text": text}, []
    else:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if messages is None or any(p.severity == "error" for p in problems):
        return None, problems
    return {"messages": messages}, problems
