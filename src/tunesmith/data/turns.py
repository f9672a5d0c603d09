"""What every row format checks the same way: a problem found in a row, and the order of its turns.

Both the chat formats (``formats``) and the preference formats (``preference``) build on this
module, so neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    field: str
    message: str
    severity: str = "error"  # error | warning


def check_turn_order(messages: list[dict[str, str]], prefix: str = "messages") -> list[Problem]:
    """Role order: an optional system turn first, then user and assistant alternating.

    >>> check_turn_order([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}])[0].message
    'row has no user turn before the assistant turn (messages[0].role is "system", messages[1].role is "assistant")'
    """
    problems = []
    previous = None
    for index, message in enumerate(messages):
        role, field = message["role"], f"{prefix}[{index}].role"
        if role == "system" and index > 0:
            problems.append(Problem(field, "a system turn may only come first"))
        elif role == "assistant" and previous in (None, "system"):
            before = f'{prefix}[{index - 1}].role is "{previous}", ' if previous else ""
            problems.append(Problem(field, f"row has no user turn before the assistant turn ({before}"
                                           f'{prefix}[{index}].role is "assistant")'))
        elif role == previous:
            problems.append(Problem(field, f"two {role} turns in a row ({prefix}[{index - 1}] and {prefix}[{index}]); "
                                           "merge them or insert the missing turn"))
        previous = role
    if not any(m["role"] == "assistant" for m in messages):
        problems.append(Problem(prefix, "row has no assistant turn: nothing to train on"))
    elif messages and messages[-1]["role"] == "user":
        problems.append(Problem(f"{prefix}[{len(messages) - 1}]", "the last user turn has no reply and is not "
                                "trained on", "warning"))
    return problems
