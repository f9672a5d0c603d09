"""task: online_dpo: the loss of a hand-made batch equals DPO's and IPO's formulas with chosen and rejected
taken from the ranking, ties skipped; a tiny model learns a reward in a few steps; a resumed run samples
what the first did; the reward-model and LLM-judge sources rank as they should (the judge behind a fake
OpenAI-compatible HTTP endpoint); a bad source fails before a run folder exists."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from tunesmith.config.load import build_config
from tunesmith.config.schema import JudgeConfig, OnlineDPOConfig
from tunesmith.data.prompts import collate_prompts
from tunesmith.data.tokenize import encode_prompt
from tunesmith.errors import ConfigError
from tunesmith.evaluation.reward import RewardModelScorer
from tunesmith.recipes import online_dpo
from tunesmith.recipes.online_dpo import JudgeRanker, OnlineDPOObjective, order_pairs, preference_source, \
    run_online_dpo
from helpers import counting_rows, read_metrics, tiny_tree, write_jsonl


def online_tree(model_dir, data, out, training: dict | None = None, **section):
    tree = tiny_tree(model_dir, data, out, "lora", **{"max_steps": 2, "batch_size": 2, "log_every": 1,
                                                      "save_every": None, **(training or {})})
    tree["task"] = "online_dpo"
    tree["online_dpo"] = {"max_new_tokens": 4, **section}
    return tree


def reply_logp(model, prompt: list[int], reply: list[int]) -> float:
    """log π(reply | prompt), summed over the reply's tokens, from the full logits (not the recipe's helpers)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + reply])).logits[0].float()  # (seq, vocab)
    log_probs = logits.log_softmax(-1)
    return sum(float(log_probs[len(prompt) - 1 + j, token]) for j, token in enumerate(reply))


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_the_loss_takes_chosen_and_rejected_from_the_ranking_and_skips_ties(tiny_model_dir, tokenizer,
                                                                           monkeypatch, loss):
    """Three prompts with fixed replies (sampling stubbed): the ranking prefers the first reply of prompt 0,
    the second of prompt 1, and ties prompt 2. The loss is the mean over the two decided pairs of
    −log σ(β·h) (IPO: (h − 1/(2β))²), h = (log π_c − log π_ref,c) − (log π_r − log π_ref,r), times
    the 3 prompts; the reference is a perturbed copy, so swapping chosen and rejected changes the number.
    Planted once each and seen failing: the chosen and rejected replies swapped in ``loss_sum`` (3.00 for
    1.40); the tie trained on as a pair (1.63 for 1.40)."""
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    reference_model = copy.deepcopy(policy).eval().requires_grad_(False)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in reference_model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    prompts = [[1, 200, 300], [1, 400], [1, 500, 600, 700]]
    replies = [[11, 12, 13], [21, 22], [31], [41, 42, 43, 44], [51, 52], [51, 52]]  # (first, second) per prompt
    monkeypatch.setattr(online_dpo.HFRollouts, "sample", lambda self, model, ids, sampling: replies)
    rewards = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    rows = datasets.Dataset.from_dict({"prompt_ids": prompts, "prompt": ["[]"] * 3, "answer": [""] * 3,
                                       "index": [0, 1, 2]})

    @contextlib.contextmanager
    def reference():
        with torch.no_grad():
            yield reference_model

    beta = 0.5
    config = OnlineDPOConfig(rewards=["helpers:text_length"], beta=beta, loss=loss)
    objective = OnlineDPOObjective(config, tokenizer, rows, lambda *args: rewards, reference, packed=False)
    batch = collate_prompts([rows[i] for i in range(3)], tokenizer.pad_token_id)
    got = objective.loss_sum(policy, batch)

    def pair_loss(prompt: list[int], chosen: list[int], rejected: list[int]) -> float:
        h = (reply_logp(policy, prompt, chosen) - reply_logp(reference_model, prompt, chosen)) - \
            (reply_logp(policy, prompt, rejected) - reply_logp(reference_model, prompt, rejected))
        return -math.log(1 / (1 + math.exp(-beta * h))) if loss == "dpo" else (h - 1 / (2 * beta)) ** 2

    expected = (pair_loss(prompts[0], replies[0], replies[1]) + pair_loss(prompts[1], replies[3], replies[2])) / 2 * 3
    swapped = (pair_loss(prompts[0], replies[1], replies[0]) + pair_loss(prompts[1], replies[2], replies[3])) / 2 * 3
    assert abs(swapped - expected) > 1e-2  # the check below tells the two assignments apart
    assert got.item() == pytest.approx(expected, rel=1e-4)
    metrics = objective.take_metrics("train")
    assert metrics["tie_share"] == pytest.approx(1 / 3)
    assert (metrics["reward_chosen"], metrics["reward_rejected"], metrics["reward_margin"]) == (1.5, 0.0, 1.5)
    assert metrics["reward"] == pytest.approx(9 / 6)

    rewards = torch.ones(3, 2)  # (the ranker reads it when called) every pair a tie: a zero loss, still backpropagated
    tied = objective.loss_sum(policy, batch)
    tied.backward()
    assert float(tied) == 0.0
    assert objective.take_metrics("train")["tie_share"] == 1.0


def test_order_pairs_follows_the_rewards():
    decided, chosen = order_pairs(torch.tensor([[0.0, 1.0], [2.0, 2.0], [5.0, -1.0], [0.5, 0.25]]))
    assert decided.tolist() == [0, 2, 3] and chosen.tolist() == [1, 0, 0]


def likely_first_word(model_dir, tokenizer) -> str:
    """The word the untrained tiny model most likely opens a reply with (a learnable target for it)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(encode_prompt(tokenizer, [{"role": "user", "content": "Count to 5."}])).logits[0, -1]
    for token in logits.argsort(descending=True).tolist():
        text = tokenizer.decode([token])
        if text.startswith(" ") and text.strip().isalpha():
            return text.strip()
    raise AssertionError("no word among the tiny model's first tokens")


def test_a_learnable_reward_rises(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """The reward prefers replies that open with the word the untrained model most likely opens with (about
    1 reply in 7 at temperature 0.5): 8 steps of 4 prompts take the sampled replies' mean reward from under
    0.2 to over 0.7 (measured: 0.0, 0.125, 0.875, 0.75, 0.625, 1.0, 1.0, 1.0), and the pairs trained on are
    ordered by the reward (the chosen reply's reward 1, the rejected's 0). Planted once and seen failing:
    chosen and rejected swapped in ``loss_sum`` (the reward fell to 0.0 from step 3)."""
    monkeypatch.setenv("TUNESMITH_TEST_WORD", likely_first_word(tiny_model_dir, tokenizer))
    data = write_jsonl(tmp_path / "prompts.jsonl", counting_rows(8))
    tree = online_tree(tiny_model_dir, data, tmp_path / "runs", {"max_steps": 8, "batch_size": 4, "lr": 2e-2},
                       rewards=["helpers:opens_with_word"], max_new_tokens=2, temperature=0.5, beta=0.1)
    run = run_online_dpo(build_config(tree))
    records = [r for r in read_metrics(run.run_dir) if "loss" in r]
    rewards = [r["reward"] for r in records]
    print("online DPO rewards per step:", rewards)
    assert len(rewards) == 8
    assert sum(rewards[:2]) / 2 < 0.2 and sum(rewards[-3:]) / 3 > 0.7, rewards
    decided = [r for r in records if "reward_chosen" in r]
    assert decided and all(r["reward_chosen"] == 1.0 and r["reward_rejected"] == 0.0 for r in decided)
    assert all(math.isfinite(r["loss"]) and 0.0 <= r["tie_share"] <= 1.0 for r in records)
    assert (run.run_dir / "model" / "adapter_config.json").is_file()


def test_a_resumed_run_samples_what_the_first_did(tiny_model_dir, tmp_path):
    """Steps 3-4 redone from the step-2 checkpoint sample the same replies (their rewards, by length, and
    token counts) and give the same losses."""
    data = write_jsonl(tmp_path / "prompts.jsonl", counting_rows(8))
    tree = online_tree(tiny_model_dir, data, tmp_path / "runs", {"max_steps": 4, "save_every": 2},
                       rewards=["helpers:text_length"])
    config = build_config(tree)
    before = [r for r in read_metrics(run_online_dpo(config).run_dir) if "loss" in r]
    after = [r for r in read_metrics(run_online_dpo(config, resume=True).run_dir) if "loss" in r]
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    for old, new in zip(before[2:], after[2:]):
        assert (new["reward"], new["completion_tokens"]) == (old["reward"], old["completion_tokens"])
        assert new["loss"] == pytest.approx(old["loss"], abs=1e-6)


def test_a_reward_model_run_ranks_the_replies(tiny_model_dir, tmp_path):
    """A tiny task: reward run as the source: the ranker puts each pair's two scores in order (first reply,
    second reply), as the reward model scores them one by one; a short run trains on its rankings."""
    from tunesmith.recipes.reward import run_reward

    pairs = [{"prompt": [{"role": "user", "content": f"Count to {n}."}], "chosen": " ".join(map(str, range(1, n + 1))),
              "rejected": "no"} for n in range(2, 8)]
    tree = tiny_tree(tiny_model_dir, write_jsonl(tmp_path / "pairs.jsonl", pairs), tmp_path / "reward", "lora",
                     max_steps=3, batch_size=2)
    tree["task"] = "reward"
    reward_run = str(run_reward(build_config(tree)).run_dir)
    data = write_jsonl(tmp_path / "prompts.jsonl", counting_rows(4))
    config = build_config(online_tree(tiny_model_dir, data, tmp_path / "runs", reward_model=reward_run))
    rank = preference_source(config.online_dpo)(torch.device("cpu"), 64)
    prompts = [p["prompt"] for p in pairs[:2]]
    first, second = ["1 2", "no"], ["no", "1 2 3"]
    scorer = RewardModelScorer(reward_run, torch.device("cpu"), 64)
    expected = [scorer([prompts[i]], [reply], [""])[0] for i in range(2) for reply in (first[i], second[i])]
    assert rank(prompts, ["", ""], first, second).flatten().tolist() == pytest.approx(expected, abs=1e-5)
    assert expected[0] != expected[1]

    records = [r for r in read_metrics(run_online_dpo(config).run_dir) if "loss" in r]
    assert len(records) == 2 and all(r["tie_share"] == 0.0 and r["reward_margin"] > 0 for r in records)


class FakeJudge:
    """An OpenAI-compatible chat endpoint on a local port; it answers ``rule(reply A, reply B)`` and keeps
    the prompts it was sent (the first is the recipe's check that it is there)."""

    def __init__(self, rule):
        self.rule, self.prompts = rule, []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][-1]["content"]
                judge.prompts.append(text)
                answer = "A"
                if "# Reply A\n" in text:
                    first = text.split("# Reply A\n")[1].split("\n\n# Reply B")[0]
                    second = text.split("# Reply B\n")[1].split("\n\nWhich reply")[0]
                    answer = judge.rule(first, second)
                payload = json.dumps({"id": "j", "object": "chat.completion", "created": 0, "model": body["model"],
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": answer}}],
                                      "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload.encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def no_proxy(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def longer(a: str, b: str) -> str:
    return "T" if len(a) == len(b) else "A" if len(a) > len(b) else "B"


def test_an_llm_judge_ranks_in_both_orders_and_a_position_bias_is_a_tie(tiny_model_dir, tmp_path, no_proxy):
    """A judge that prefers the longer reply decides each pair the same in both orders; one that always
    answers A (pure position bias) ties every pair. A 2-step run asks the endpoint twice per pair (both
    orders) after one check that it answers, and trains on its rankings."""
    judge = FakeJudge(longer)
    try:
        config = JudgeConfig(url=judge.url, model="judge")
        rank = JudgeRanker(config)
        prompts = [[{"role": "user", "content": "hi"}]] * 3
        assert rank(prompts, ["", "", ""], ["long reply", "x", "same"], ["y", "longer reply", "same"]).tolist() == \
            [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
        judge.rule = lambda a, b: "A"
        assert rank(prompts, ["", "", ""], ["long reply", "x", "same"], ["y", "longer reply", "same"]).tolist() == \
            [[0.5, 0.5]] * 3
        judge.rule, judge.prompts = longer, []

        data = write_jsonl(tmp_path / "prompts.jsonl", counting_rows(4))
        tree = online_tree(tiny_model_dir, data, tmp_path / "runs", judge={"url": judge.url, "model": "judge"})
        records = [r for r in read_metrics(run_online_dpo(build_config(tree)).run_dir) if "loss" in r]
    finally:
        judge.close()
    assert len(judge.prompts) == 1 + 2 * 2 * 2  # the check, then 2 steps x 2 pairs x both orders
    assert all("# Reply A\n" in text and "Count to" in text for text in judge.prompts[1:])
    assert all(r["judge_unparsed"] == 0 for r in records)
    decided = [r for r in records if "reward_chosen" in r]
    assert decided and all(r["reward_chosen"] == 1.0 and r["reward_rejected"] == 0.0 for r in decided)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("section, message", [
    ({"judge": {"url": "http://127.0.0.1:{port}/v1", "model": "judge"}},
     r"online_dpo.judge: the judge's endpoint http://127.0.0.1:\d+/v1 cannot be reached"),
    ({"reward_model": "{tmp}/nope"}, r"online_dpo.reward_model: .*nope is not a finished run folder"),
    ({"rewards": ["helpers:nope"]}, r"online_dpo.rewards: reward 'helpers:nope'"),
], ids=["unreachable-judge", "missing-reward-model", "unknown-reward"])
def test_a_bad_source_fails_before_a_run_folder(tiny_model_dir, tmp_path, no_proxy, section, message):
    section = json.loads(json.dumps(section).replace("{port}", str(free_port())).replace("{tmp}", str(tmp_path)))
    data = write_jsonl(tmp_path / "prompts.jsonl", counting_rows(4))
    with pytest.raises(ConfigError, match=message):
        run_online_dpo(build_config(online_tree(tiny_model_dir, data, tmp_path / "runs", **section)))
    assert not (tmp_path / "runs").exists()
