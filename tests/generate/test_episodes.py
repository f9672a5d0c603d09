"""Multi-turn rollouts (generate/episodes.py) with a scripted engine: the tokens are the template's, the
sampled turns are trained on and the tool results masked, the turn limit holds, a turn ends with its
first complete call; and the calculator environment."""

from __future__ import annotations

import pytest

from tunesmith.data.tokenize import render
from tunesmith.environments import Calculator, calculate, load_environment
from tunesmith.generate.episodes import run_episodes
from tunesmith.generate.sample import SamplingConfig

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6 * 7"}}\n</tool_call>'
ROW = {"messages": [{"role": "user", "content": "What is six times seven?"}], "answer": "6 * 7 = 42\n#### 42"}


class Scripted:
    """A rollout engine that answers each episode's turns from a script (texts, each ended by <|im_end|>
    unless it ends with "…", which stands for a turn cut by max_new_tokens)."""

    def __init__(self, tokenizer, turns: list[str]):
        self.tokenizer, self.turns, self.calls = tokenizer, list(turns), 0

    def sample(self, model, prompts, sampling):
        out = []
        for _ in prompts:
            text = self.turns[min(self.calls, len(self.turns) - 1)]
            ids = self.tokenizer(text.rstrip("…"), add_special_tokens=False)["input_ids"]
            out.append(ids if text.endswith("…") else ids + [self.tokenizer.convert_tokens_to_ids("<|im_end|>")])
        self.calls += 1
        return out

    def close(self):
        pass


@pytest.fixture
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def test_tool_results_are_context_and_the_sampled_turns_are_trained_on(tokenizer, model):
    engine = Scripted(tokenizer, [CALL, "So the answer is 42.\n#### 42"])
    [episode] = run_episodes(engine, model, tokenizer, Calculator(), [ROW], SamplingConfig(32), 4, 1024)
    assert (episode.turns, episode.calls, episode.reward) == (2, 1, 1.0)
    assert Calculator().metrics(episode.state) == {"correct": 1.0, "calculated": 1.0}
    # The whole sequence is exactly what the template renders for the conversation.
    rendered, sampled = render(tokenizer, episode.messages, False), tokenizer.decode(episode.input_ids)
    assert rendered.startswith(sampled) and rendered[len(sampled):] == "\n"  # the template's tail after the last turn
    assert [m["role"] for m in episode.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert episode.messages[3]["content"] == "42"
    trained = [t for t, label in zip(episode.input_ids, episode.labels) if label != -100]
    assert all(label in (-100, token) for token, label in zip(episode.input_ids, episode.labels))
    assert tokenizer.decode(trained) == CALL + "<|im_end|>" + "So the answer is 42.\n#### 42<|im_end|>"
    [(start, end)] = episode.tool_spans
    assert set(episode.labels[start:end]) == {-100}
    assert tokenizer.decode(episode.input_ids[start:end]) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"


def test_the_turn_limit_holds_and_the_last_turns_calls_are_not_run(tokenizer, model):
    engine = Scripted(tokenizer, [CALL])  # calls the calculator every turn
    episodes = run_episodes(engine, model, tokenizer, Calculator(), [ROW, ROW], SamplingConfig(32), 3, 4096)
    assert [(e.turns, e.calls) for e in episodes] == [(3, 2), (3, 2)] and engine.calls == 3
    assert [m["role"] for m in episodes[0].messages][-1] == "assistant" and episodes[0].reward == 0.0


def test_a_turn_ends_with_its_first_complete_call(tokenizer, model):
    """Text after a call is not sampled on: the turn is cut after the call, the template's turn end follows
    (masked: the model did not sample it), and the tool runs."""
    engine = Scripted(tokenizer, [CALL + "\nand then some more words…", "#### 42"])
    [episode] = run_episodes(engine, model, tokenizer, Calculator(tool_bonus=0.5), [ROW], SamplingConfig(32), 4, 1024)
    assert (episode.turns, episode.calls, episode.reward) == (2, 1, 1.5)
    assert "more words" not in tokenizer.decode(episode.input_ids)
    end = episode.input_ids.index(tokenizer.convert_tokens_to_ids("<|im_end|>"), episode.labels.index(
        next(label for label in episode.labels if label != -100)))
    assert episode.labels[end] == -100 and episode.labels[end - 1] != -100


def test_a_turn_without_a_call_or_cut_by_length_ends_the_episode(tokenizer, model):
    for script in (["I think it is 42."], [CALL[:-3] + "…"]):
        [episode] = run_episodes(Scripted(tokenizer, script), model, tokenizer, Calculator(), [ROW],
                                 SamplingConfig(32), 4, 1024)
        assert (episode.turns, episode.calls) == (1, 0)


def test_no_room_for_another_turn_ends_the_episode(tokenizer, model):
    prompt = len(tokenizer.apply_chat_template([{"role": "system", "content": "x" * 10}, *ROW["messages"]]))
    [episode] = run_episodes(Scripted(tokenizer, [CALL]), model, tokenizer, Calculator(), [ROW],
                             SamplingConfig(200), 4, prompt + 300)
    assert episode.turns == 1 and not episode.tool_spans


def test_prefill_starts_the_first_turn_as_prompt(tokenizer, model):
    """With prefill_call the first turn continues a call's opening: the opening is prompt (masked), and
    what the model adds completes the call."""
    engine = Scripted(tokenizer, ['2 + 3"}}\n</tool_call>', "#### 5"])
    [episode] = run_episodes(engine, model, tokenizer, Calculator(prefill_call=True), [ROW], SamplingConfig(32),
                             4, 1024)
    assert episode.messages[3]["content"] == "5" and episode.calls == 1
    trained = tokenizer.decode([t for t, label in zip(episode.input_ids, episode.labels) if label != -100])
    assert trained.startswith('2 + 3"}}') and '"expression"' not in trained


def test_the_calculator_evaluates_arithmetic_and_nothing_else():
    assert calculate("(12 + 30) * 4") == 168 and calculate("-3 ** 2") == -9 and calculate("7 / 2") == 3.5
    for bad in ("2 ** 1000000", "1 / 0", "open('x')", "x + 1", "[1] * 3", "1e300 * 1e300", ""):
        with pytest.raises(ValueError):
            calculate(bad)
    calculator = Calculator()
    state = calculator.start(ROW)
    results = calculator.step(state, [
        {"id": "a", "function": {"name": "calculator", "arguments": '{"expression": "10 / 4"}'}},
        {"id": "b", "function": {"name": "calculator", "arguments": '{"expr": "1"}'}},
        {"id": "c", "function": {"name": "search", "arguments": "{}"}}])
    assert results[0] == "2.5" and results[1].startswith("error") and "calculator" in results[2]
    assert state["used"] == 1


def test_an_environment_is_named_module_colon_class():
    assert isinstance(load_environment("tunesmith.environments:Calculator", {"tool_bonus": 0.1}), Calculator)
    with pytest.raises(ValueError, match="cannot import"):
        load_environment("tunesmith.environments:Nope")
    with pytest.raises(ValueError, match="unexpected keyword"):
        load_environment("tunesmith.environments:Calculator", {"bonus": 1})
    with pytest.raises(ValueError, match="has no tools"):
        load_environment("collections:OrderedDict")


def test_hostile_calls_are_errors_for_the_model_not_for_the_run(tokenizer, model):
    """Deep nesting, float overflow and very long expressions come back as the tool's error; a call nested
    past Python's parser is not a call."""
    for expression in ("-" * 3000 + "1", "100000.0 ** 64", "9" * 400 + " / 3", "+".join(["1"] * 3000),
                       "(" * 500 + "1" + ")" * 500):
        with pytest.raises(ValueError):
            calculate(expression)
    deep = '<tool_call>\n{"name": "calculator", "arguments": {"expression": ' + "[" * 3000
    [episode] = run_episodes(Scripted(tokenizer, [deep]), model, tokenizer, Calculator(), [ROW], SamplingConfig(32),
                             4, 8192)
    assert (episode.turns, episode.calls) == (1, 0)


def test_a_call_whose_results_do_not_fit_is_not_run_and_the_reward_reads_the_models_reply(tokenizer, model):
    """The model computes the answer with the tool, then the context is full: the results are not shown, so
    they neither reach the reward nor pay the tool bonus."""
    opening = len(run_episodes(Scripted(tokenizer, ["x"]), model, tokenizer, Calculator(), [ROW], SamplingConfig(8),
                               1, 4096)[0].input_ids)
    call = len(tokenizer(CALL)["input_ids"]) + 1
    [episode] = run_episodes(Scripted(tokenizer, [CALL]), model, tokenizer, Calculator(tool_bonus=0.5), [ROW],
                             SamplingConfig(8), 4, opening - 2 + call + 8 + 3)
    assert episode.messages[-1]["role"] == "assistant" and (episode.calls, episode.reward) == (0, 0.0)
