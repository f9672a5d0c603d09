"""Environments for multi-turn RL (``grpo.environment``): tools the model may call, what each call returns,
and the episode's final reward.

An environment is a class named in the config as ``module:Class`` (``grpo.environment_args`` are its
keyword arguments) with:

- ``tools``: OpenAI function tools (``{"type": "function", "function": {"name", "description",
  "parameters"}}``). They reach the model through its chat template (``tools=``) where the template
  supports tools; otherwise they are described in the system message with Hermes's call syntax.
- ``instructions``: text for the system message (how to finish, what format the answer takes); may be "".
- ``prefill`` (optional): text that starts the model's first turn, as part of the prompt (not trained on).
- ``start(row) -> state``: a new episode for a prompt row (``{"messages": [...], "answer": str | None}``).
- ``step(state, calls) -> list[str]``: the result of each tool call (OpenAI's ``{"id", "function": {"name",
  "arguments"}}``, arguments a JSON string), one string per call, in order.
- ``reward(state, messages) -> float``: the final reward, given the whole conversation (the prompt's messages,
  the model's turns and the tools' results; the last message is the model's last reply).
- ``metrics(state) -> dict[str, float]`` (optional): numbers of a finished episode, averaged over a step's
  episodes into metrics.jsonl as ``env/NAME``.

The rollout (``generate/episodes.py``) alternates the model's turns with the tools' results until a turn
calls no tool, ``grpo.max_turns`` turns have been generated, or the context is full; the results are in
the training sequence as context and masked out of the loss.
"""

from __future__ import annotations

import ast
import importlib
import json
import math
import operator
from typing import Any, Protocol

from tunesmith.rewards import final_answer


class Environment(Protocol):
    tools: list[dict]
    instructions: str

    def start(self, row: dict) -> Any: ...

    def step(self, state: Any, calls: list[dict]) -> list[str]: ...

    def reward(self, state: Any, messages: list[dict]) -> float: ...


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_LIMIT = 1e15  # a result past this is refused (and 2 ** 10 ** 9 never computed)
_LONGEST = 200  # characters of an expression at most: a model's arithmetic, not a stress test


def calculate(expression: str) -> float:
    """The value of an arithmetic expression: numbers, + - * / // % **, parentheses and signs; ValueError for
    anything else (names, calls, attributes) or a result out of range. Parsed, never ``eval``'d.

    >>> calculate("3 * (4 + 5) - 2 ** 3"), calculate("1,200 / 4"), calculate("7 % 4")
    (19, 300.0, 3)
    >>> calculate("__import__('os')")
    Traceback (most recent call last):
    ...
    ValueError: only numbers and + - * / // % ** ( ) are allowed
    """
    if len(expression) > _LONGEST:
        raise ValueError(f"the expression is longer than {_LONGEST} characters")
    try:
        tree = ast.parse(expression.replace(",", "").replace("×", "*").replace("÷", "/").strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError):
        raise ValueError("not an arithmetic expression") from None

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = value(node.operand)
            return -inner if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
                raise ValueError("the power is too large")
            try:
                result = _OPERATORS[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ValueError("division by zero") from None
            if isinstance(result, complex) or not math.isfinite(result) or abs(result) > _LIMIT:
                raise ValueError("the result is out of range")
            return result
        raise ValueError("only numbers and + - * / // % ** ( ) are allowed")

    try:
        return value(tree.body)
    except (OverflowError, RecursionError, MemoryError):  # a float past its range; nesting past Python's stack
        raise ValueError("the result is out of range") from None


def _shown(number: float) -> str:
    """A result as a person writes it: 12 not 12.0, at most 6 decimals."""
    if float(number).is_integer():
        return str(int(number))
    return f"{number:.6f}".rstrip("0").rstrip(".")


class Calculator:
    """GSM8K with a calculator: the model may call ``calculator(expression)`` and gets the value back; the
    reward is 1 when the final reply's answer (after ``####``, else its last number) equals the reference's
    ``#### n``, plus ``tool_bonus`` when the episode made at least one call that returned a value (a shaping
    term for models that have never used a tool; 0 by default). ``prefill_call`` starts the first turn with a
    calculator call's opening, for a model that never calls it on its own (the embedded 135M one: 0 calls in
    48 GSM8K episodes with these instructions and an example)."""

    tools = [{"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression (numbers, + - * / % ** and "
        "parentheses) and return its value.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description":
                                                                       "for example (12 + 30) * 4"}},
                       "required": ["expression"]}}}]
    instructions = ("Solve the problem step by step. Use the calculator for arithmetic. End your last reply "
                    "with the final answer as: #### <number>")

    def __init__(self, tool_bonus: float = 0.0, prefill_call: bool = False):
        self.tool_bonus = tool_bonus
        # The first turn starts a calculator call (Hermes's syntax), for models that never call one on their own.
        self.prefill = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "' if prefill_call else ""

    def start(self, row: dict) -> dict:
        return {"answer": row.get("answer"), "used": 0}

    def step(self, state: dict, calls: list[dict]) -> list[str]:
        results = []
        for call in calls:
            function = call.get("function", {})
            if function.get("name") != "calculator":
                results.append(f"error: no tool named {function.get('name')!r}; the tool is calculator")
                continue
            try:
                arguments = json.loads(function.get("arguments") or "{}")
                expression = arguments.get("expression") if isinstance(arguments, dict) else None
                if not isinstance(expression, str):
                    raise ValueError('the arguments must be {"expression": "..."}')
                results.append(_shown(calculate(expression)))
                state["used"] += 1
            except ValueError as err:
                results.append(f"error: {err}")
        return results

    def reward(self, state: dict, messages: list[dict]) -> float:
        expected, got = final_answer(state["answer"]), final_answer(messages[-1]["content"])
        state["correct"] = expected is not None and got is not None and abs(expected - got) < 1e-6
        return float(state["correct"]) + (self.tool_bonus if state["used"] else 0.0)

    def metrics(self, state: dict) -> dict[str, float]:
        """``correct``: the share of episodes with the right answer; ``calculated``: with a call that returned a value."""
        return {"correct": float(state.get("correct", False)), "calculated": float(state["used"] > 0)}


def load_environment(name: str, arguments: dict | None = None) -> Environment:
    """``module:Class`` (or ``module.Class``) and its keyword arguments -> an environment; ValueError naming
    what is wrong otherwise."""
    module_name, _, attribute = name.partition(":") if ":" in name else name.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"environment {name!r}: cannot import it ({err}); name a class as module:Class") from None
    try:
        environment = factory(**(arguments or {}))
    except TypeError as err:
        raise ValueError(f"environment {name!r}: {err}") from None
    missing = [part for part in ("tools", "start", "step", "reward") if not hasattr(environment, part)]
    if missing:
        raise ValueError(f"environment {name!r} has no {', '.join(missing)} (see tunesmith.environments)")
    return environment
