"""The LLM judge: both orders per row, so a judge biased to a position gives 0.5, not a win."""

from types import SimpleNamespace

import pytest

from tunesmith.evaluation.judge import JudgeSettings, judge_rows


class FakeEndpoint:
    """An OpenAI-style client whose judge answers by ``rule(reply A, reply B)``; it keeps the prompts."""

    def __init__(self, rule):
        self.rule, self.prompts = rule, []
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    def create(self, model, messages, temperature, max_tokens):
        text = messages[-1]["content"]
        self.prompts.append(text)
        first = text.split("# Reply A\n")[1].split("\n\n# Reply B")[0]
        second = text.split("# Reply B\n")[1].split("\n\nWhich reply")[0]
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=self.rule(first, second)))])


PROMPTS = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
REFERENCES = [f"reference {i}" for i in range(4)]
SETTINGS = JudgeSettings("http://judge/v1", "judge-model")


def test_a_judge_that_always_picks_position_a_scores_one_half():
    endpoint = FakeEndpoint(lambda a, b: "A")
    judged = judge_rows(SETTINGS, PROMPTS, REFERENCES, ["mine"] * 4, ["theirs"] * 4, client=endpoint)
    assert judged["scores"].tolist() == [0.5] * 4
    assert judged["consistency"] == 0.0 and judged["unparsed"] == 0
    assert len(endpoint.prompts) == 8  # each row twice
    assert "# Reply A\nmine" in endpoint.prompts[0] and "# Reply A\ntheirs" in endpoint.prompts[1]
    assert "# Reference answer\nreference 0" in endpoint.prompts[0] and "question 0" in endpoint.prompts[0]


def test_a_judge_of_content_gives_wins_losses_and_ties_in_either_order():
    def prefers_good(a, b):
        return "T" if ("good" in a) == ("good" in b) else ("A" if "good" in a else "B")
    mine = ["good answer", "bad answer", "good too", "meh"]
    theirs = ["bad", "good answer", "good also", "no idea"]
    judged = judge_rows(SETTINGS, PROMPTS, REFERENCES, mine, theirs, client=FakeEndpoint(prefers_good))
    assert judged["scores"].tolist() == [1.0, 0.0, 0.5, 0.5]
    assert judged["consistency"] == 1.0
    assert judged["verdicts"][0] == ["A", "B"]


def test_answers_without_a_verdict_count_as_ties_and_are_counted():
    judged = judge_rows(SETTINGS, PROMPTS[:2], REFERENCES[:2], ["x", "y"], ["z", "w"],
                        client=FakeEndpoint(lambda a, b: "I cannot decide"))
    assert judged["scores"].tolist() == [0.5, 0.5] and judged["unparsed"] == 4


@pytest.mark.parametrize("answer", ["B", "b) clearly", "**B**"])
def test_verdict_formats(answer):
    judged = judge_rows(SETTINGS, PROMPTS[:1], REFERENCES[:1], ["x"], ["y"],
                        client=FakeEndpoint(lambda a, b: answer if a == "x" else "A"))
    assert judged["scores"].tolist() == [0.0]  # B in the first order (theirs), A in the second (theirs)
