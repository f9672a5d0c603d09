"""Multi-turn rollouts: the model's turns alternate with an environment's tool results.

Each episode starts from a prompt row, with the environment's tools given to the chat template (or, for a
template without tool support, described in the system message with Hermes's ``<tool_call>`` syntax), its
instructions in the system message, and its ``prefill`` (if any) as the start of the first turn, part of
the prompt: a model too small to follow the instructions (the embedded 135M one) never calls a tool on
its own, and RL cannot reinforce what is never sampled. A turn is sampled by the rollout engine for every open episode
at once; a turn that calls tools gets their results (``environment.step``) as ``tool`` messages, rendered
by the chat template, and the next turn follows. A turn ends at its stop token or with its first complete
tool call (as a stop string would end it; the template's turn-end token then follows as context). An
episode ends when a turn calls no tool, when it has ``max_turns`` turns (a last turn's calls are not
run), when a turn is cut by ``max_new_tokens``, or when the next turn would pass ``max_length`` tokens. The training sequence is the prompt, the turns and the
tool results, with the prompt and the tool results masked out of the loss (label -100): the policy is
trained on the tokens it sampled, and nothing else.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from tunesmith.data.tokenize import render, turn_end_token
from tunesmith.data.tools import HERMES, CallSyntax, call_syntax, parse_calls
from tunesmith.environments import Environment
from tunesmith.generate.rollout import RolloutEngine
from tunesmith.generate.sample import SamplingConfig, stop_token_ids
from tunesmith.models.fastpath import unwrapped_parts


@dataclass
class Episode:
    input_ids: list[int]
    labels: list[int]
    messages: list[dict]  # the conversation as the template saw it
    state: Any
    turns: int = 0
    calls: int = 0
    done: bool = False
    reward: float = 0.0
    tool_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each tool-result segment


def _system_text(environment: Environment, syntax: CallSyntax | None) -> str:
    """The system message's text: the environment's instructions, and where the template does not take
    ``tools``, the tools and how to call them."""
    parts = [getattr(environment, "instructions", "") or ""]
    if syntax is None and environment.tools:
        example = environment.tools[0]["function"]
        call = HERMES.opening(example["name"]) + json.dumps({"…": "…"}, ensure_ascii=False) + HERMES.after_arguments
        parts.append("You can call these tools:\n" + "\n".join(json.dumps(t["function"]) for t in environment.tools)
                     + f"\nTo call one, write\n{call}\nwith its arguments as a JSON object, then wait for the result.")
    return "\n\n".join(p for p in parts if p)


def opening_messages(prompt: list[dict], environment: Environment, syntax: CallSyntax | None) -> list[dict]:
    """The prompt's messages with the environment's system text before (or after) the prompt's own system message."""
    text = _system_text(environment, syntax)
    if not text:
        return list(prompt)
    if prompt and prompt[0]["role"] == "system":
        return [{"role": "system", "content": prompt[0]["content"] + "\n\n" + text}, *prompt[1:]]
    return [{"role": "system", "content": text}, *prompt]


class Conversation:
    """Renders an episode's turns with the chat template: the prompt, and the text that follows a sampled
    turn (the end of that turn as the template writes it, the tool results, the next generation prompt)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, environment: Environment):
        self.tokenizer, self.environment = tokenizer, environment
        self.syntax = call_syntax(tokenizer)
        self.tools = environment.tools if self.syntax is not None else None
        self.turn_end = turn_end_token(tokenizer)
        self.turn_end_id = tokenizer.convert_tokens_to_ids(self.turn_end)

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        if self.tools:
            return self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        return render(self.tokenizer, messages, generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, messages: list[dict], prefill: str = "") -> list[int]:
        return self.encode(self._render(messages, True) + prefill)

    def assistant(self, text: str, content: str | None, calls: list[dict]) -> dict:
        """The assistant message of a sampled turn (``text``; ``content`` and ``calls`` parsed from it) as the
        template takes it."""
        if self.syntax is None or not calls:
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": content or "", "tool_calls": [
            {"id": c["id"], "type": "function",
             "function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
            for c in calls]}

    def after_turn(self, messages: list[dict], replies: list[dict]) -> str:
        """The text between the end of the sampled turn (its stop token) and the next turn: the rest of the
        turn's ending, ``replies`` (tool messages), and the generation prompt. ValueError for a template
        that re-renders earlier turns (then the tokens sampled would not be the ones the template shows)."""
        before = self._render(messages, False)
        after = self._render([*messages, *replies], True)
        if not after.startswith(before):
            raise ValueError("the chat template writes earlier turns differently once tool results follow them; "
                             "multi-turn rollouts need a template that only appends")
        cut = before.rfind(self.turn_end)
        ending = before[cut + len(self.turn_end):] if cut >= 0 else ""
        return ending + after[len(before):]


def longest_prompt(tokenizer: PreTrainedTokenizerBase, environment: Environment, prompts: list[list[dict]]) -> int:
    """The most tokens an episode's opening takes (the environment's system text, tools and prefill included):
    checked against the context before training starts."""
    conversation = Conversation(tokenizer, environment)
    prefill = getattr(environment, "prefill", "") or ""
    return max((len(conversation.prompt(opening_messages(messages, environment, conversation.syntax), prefill))
                for messages in prompts), default=0)


def _after_first_call(tokenizer: PreTrainedTokenizerBase, start: str, completion: list[int], syntax: CallSyntax
                      ) -> int:
    """How many of ``completion``'s tokens it takes to complete the first tool call (``start``, the turn's
    prefill, before them); the completion holds one. A binary search: once complete, a call stays complete
    as tokens are added."""
    low, high = 1, len(completion)  # the answer is in [low, high]
    while low < high:
        middle = (low + high) // 2
        if parse_calls(start + tokenizer.decode(completion[:middle], skip_special_tokens=True), syntax)[1]:
            high = middle
        else:
            low = middle + 1
    return high


def run_episodes(engine: RolloutEngine, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 environment: Environment, rows: list[dict], sampling: SamplingConfig, max_turns: int,
                 max_length: int) -> list[Episode]:
    """One episode per row (``{"messages": prompt messages, "answer": ...}``), every open episode's next turn
    sampled together; each episode's reward set by the environment at its end."""
    conversation = Conversation(tokenizer, environment)
    syntax = conversation.syntax or HERMES
    stops = set(stop_token_ids(unwrapped_parts(model)[1], tokenizer))
    episodes = []
    prefill = getattr(environment, "prefill", "") or ""
    for row in rows:
        messages = opening_messages(row["messages"], environment, conversation.syntax)
        ids = conversation.prompt(messages, prefill)
        episodes.append(Episode(ids, [-100] * len(ids), messages, environment.start(row)))
    while open_ := [e for e in episodes if not e.done]:
        completions = engine.sample(model, [e.input_ids for e in open_], sampling)
        for episode, completion in zip(open_, completions):
            start = prefill if episode.turns == 0 else ""
            stopped = bool(completion) and completion[-1] in stops
            text = start + tokenizer.decode(completion[:-1] if stopped else completion, skip_special_tokens=True)
            content, calls = parse_calls(text, syntax)
            ending: list[int] = []
            sampled = completion[:-1] if stopped else completion  # a stop right after the call is the model's own
            cut = _after_first_call(tokenizer, start, sampled, syntax) if calls else None
            if cut is not None and not (stopped and cut == len(sampled)):  # else it stopped right after the call
                # The turn ends with its first complete call, as a stop string would end it; the template's
                # turn end follows, context the model did not sample (masked).
                completion, ending, stopped = completion[:cut], [conversation.turn_end_id], True
                text = start + tokenizer.decode(completion, skip_special_tokens=True)
                content, calls = parse_calls(text, syntax)
            episode.input_ids += completion + ending
            episode.labels += completion + [-100] * len(ending)
            episode.turns += 1
            message = conversation.assistant(text, content, calls)
            episode.messages.append(message)
            room = max_length - len(episode.input_ids) - sampling.max_new_tokens  # for the tools' results
            if not calls or not stopped or episode.turns >= max_turns or room <= 0:
                episode.done = True  # no room: the calls are not run, and the last message is the model's
                continue
            before = copy.deepcopy(episode.state)
            results = environment.step(episode.state, calls)
            if len(results) != len(calls):
                raise ValueError(f"{type(environment).__name__}.step returned {len(results)} results for "
                                 f"{len(calls)} tool calls (one string per call, in order)")
            replies = [{"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                        "content": str(result)} for call, result in zip(calls, results)]
            segment = conversation.encode(conversation.after_turn(episode.messages, replies))
            if len(segment) > room:  # the results do not fit with another turn: the calls are undone (the
                episode.state, episode.done = before, True  # environment's state as it was), the last message
                continue                                     # stays the model's
            episode.calls += len(calls)
            episode.messages += replies
            episode.tool_spans.append((len(episode.input_ids), len(episode.input_ids) + len(segment)))
            episode.input_ids += segment
            episode.labels += [-100] * len(segment)
    for episode in episodes:
        episode.reward = float(environment.reward(episode.state, episode.messages))
    return episodes
