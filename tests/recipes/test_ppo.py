"""task: ppo: GAE, the clipped policy and value losses and the adaptive KL controller by hand; a
tiny run resumes exactly from a checkpoint between batches of rollouts; bad configs fail before a
run folder exists; a reward model scores completions as `reward score` does; the embedded model's
mean reward rises (slow)."""

import math

import pytest
import torch

from tunesmith.config.load import build_config
from tunesmith.errors import ConfigError
from tunesmith.evaluation.reward import RewardModelScorer
from tunesmith.losses.rl import AdaptiveKL, gae, ppo_policy_loss, ppo_value_loss, whiten
from tunesmith.recipes.ppo import run_ppo
from helpers import counting_rows, read_metrics, tiny_tree, write_jsonl


def test_gae_by_hand():
    rewards, values = torch.tensor([[0.0, 0.5, 1.0]]), torch.tensor([[0.2, 0.4, 0.6]])
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.6  # last token: no next value
    d1 = 0.5 + gamma * 0.6 - 0.4
    d0 = 0.0 + gamma * 0.4 - 0.2
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma, lam)
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2])
    assert returns[0].tolist() == pytest.approx([a0 + 0.2, a1 + 0.4, a2 + 0.6])
    # A masked tail is not part of the row: the same numbers for a row padded to 4.
    padded, _ = gae(torch.tensor([[0.0, 0.5, 1.0, 9.0]]), torch.tensor([[0.2, 0.4, 0.6, 9.0]]),
                    torch.tensor([[1, 1, 1, 0]]), gamma, lam)
    assert padded[0].tolist() == pytest.approx([a0, a1, a2, 0.0])


def test_ppo_losses_by_hand_and_their_gradients():
    logps = torch.tensor([-1.0, -2.0], requires_grad=True)
    old = torch.tensor([-1.5, -2.1])  # ratios e^0.5 (clipped at 1.2 for A > 0) and e^0.1 (inside)
    loss, clipped = ppo_policy_loss(logps, old, torch.tensor([2.0, -1.0]), epsilon=0.2)
    assert loss.tolist() == pytest.approx([-1.2 * 2.0, math.exp(0.1)])
    assert clipped.tolist() == [True, False]
    loss.sum().backward()
    assert logps.grad.tolist() == pytest.approx([0.0, math.exp(0.1)])  # clipped: no gradient; A < 0: pushed down
    values = torch.tensor([1.0, 0.05], requires_grad=True)
    value_loss, value_clipped = ppo_value_loss(values, torch.tensor([0.5, 0.0]), torch.tensor([2.0, 0.0]), clip=0.2)
    # first: V moved 0.5 from V_old, clipped to 0.7: max((1-2)², (0.7-2)²)/2 = 0.845; second: inside the clip
    assert value_loss.tolist() == pytest.approx([0.5 * 1.3 ** 2, 0.5 * 0.05 ** 2])
    assert value_clipped.tolist() == [True, False]
    whitened = whiten(torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1, 1, 1, 0]))
    assert whitened[:3].tolist() == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)], rel=1e-6)
    assert whitened[3].item() == 0.0


def test_adaptive_kl_controller_by_hand():
    kl = AdaptiveKL(0.2, target=4.0, horizon=1000)
    assert kl.update(5.0, 8) == pytest.approx(0.2 * (1 + 0.2 * 8 / 1000))  # error 5/4 - 1 = 0.25, clipped to 0.2
    kl = AdaptiveKL(0.2, target=4.0, horizon=1000)
    assert kl.update(4.4, 10) == pytest.approx(0.2 * (1 + 0.1 * 10 / 1000))  # within the clip
    assert kl.update(0.0, 10) == pytest.approx(0.2 * (1 + 0.1 * 10 / 1000) * (1 - 0.2 * 10 / 1000))
    fixed = AdaptiveKL(0.2, target=None, horizon=1000)
    assert fixed.update(100.0, 10) == 0.2


def ppo_tree(model_dir, data, out, **ppo):
    tree = tiny_tree(model_dir, data, out, "lora", max_steps=8, batch_size=4, save_every=4)
    tree["task"] = "ppo"
    tree["ppo"] = {"rewards": ["helpers:text_length"], "max_new_tokens": 8, "ppo_epochs": 2, "minibatches": 2, **ppo}
    return tree


def test_ppo_trains_and_resumes_exactly(tiny_model_dir, tmp_path):
    """Steps 5-8 redone from the step-4 checkpoint (between two batches of rollouts) sample the same
    completions and give the same losses; the value head is saved beside the policy."""
    data = write_jsonl(tmp_path / "prompts.jsonl", counting_rows(8))
    config = build_config(ppo_tree(tiny_model_dir, data, tmp_path / "runs"))
    first = run_ppo(config)
    before = read_metrics(first.run_dir)
    assert [r["step"] for r in before if "reward" in r] == [1, 5]  # rollouts at the first of 2 x 2 steps
    assert all(math.isfinite(r["kl"]) for r in before if "kl" in r)
    assert before[4]["kl"] > 0  # the policy moved away from the reference during the first batch
    assert any(r["clip_fraction"] > 0 for r in before)
    assert (first.run_dir / "value_head" / "value_head.safetensors").is_file()
    assert (first.run_dir / "model" / "adapter_config.json").is_file()
    resumed = run_ppo(config, resume=True)
    after = read_metrics(resumed.run_dir)
    assert [r["step"] for r in after] == list(range(1, 9))
    for old, new in zip(before[4:], after[4:]):
        assert new.get("reward") == old.get("reward") and new.get("completion_tokens") == old.get("completion_tokens")
        assert new["loss"] == pytest.approx(old["loss"], abs=1e-6)
        assert new.get("kl_coef") == old.get("kl_coef")


@pytest.mark.parametrize("change, message", [
    ({"training.save_every": 3}, "save_every \\(3\\) must be a multiple of ppo.ppo_epochs x ppo.minibatches \\(4\\)"),
    ({"training.grad_accum": 2}, "grad_accum must be 1"),
    ({"ppo.reward_model": "somewhere"}, "ppo takes one reward source"),
])
def test_bad_ppo_configs_are_refused(tiny_model_dir, tmp_path, change, message):
    tree = ppo_tree(tiny_model_dir, tmp_path / "p.jsonl", tmp_path / "runs")
    for key, value in change.items():
        section, field = key.split(".")
        tree[section][field] = value
    with pytest.raises(ConfigError, match=message):
        build_config(tree)


def test_missing_reward_model_fails_before_a_run_folder(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", counting_rows(4))
    tree = ppo_tree(tiny_model_dir, data, tmp_path / "runs", rewards=[], reward_model=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="ppo.reward_model: .*nope is not a finished run folder"):
        run_ppo(build_config(tree))
    assert not (tmp_path / "runs").exists()


def test_reward_model_scores_completions_as_reward_score_does(tiny_model_dir, tmp_path):
    from tunesmith.evaluation.reward import score_file
    from tunesmith.recipes.reward import run_reward

    pairs = [{"prompt": [{"role": "user", "content": f"Count to {n}."}], "chosen": " ".join(map(str, range(1, n + 1))),
              "rejected": "no"} for n in range(2, 8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    tree = tiny_tree(tiny_model_dir, data, tmp_path / "runs", "lora", max_steps=3, batch_size=2)
    tree["task"] = "reward"
    reward_run = run_reward(build_config(tree)).run_dir
    scorer = RewardModelScorer(str(reward_run), torch.device("cpu"), 64)
    scores = scorer([p["prompt"] for p in pairs], [p["chosen"] for p in pairs], [""] * len(pairs))
    expected = [s.scores["chosen"] for s in score_file(scorer.model, scorer.tokenizer, str(data), 64)]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 5) for s in scores)) > 1  # the scores depend on the completion


PROMPTS = ["Name a color.", "Name an animal.", "Pick a color for my new car.", "Name a fruit.", "Name a city.",
           "Say something about the sea."]


@pytest.mark.slow
def test_ppo_raises_the_mean_reward(embedded_dir, tmp_path):
    """The embedded model, LoRA, a reward for replies that open with "The": 6 batches of the 6
    prompts, 4 PPO epochs each (0.167 before any update, 1.000 over the last 3 batches)."""
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "x"}]} for p in PROMPTS]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    tree = tiny_tree(embedded_dir, data, tmp_path / "runs", "lora", max_steps=24, batch_size=6, lr=2e-3)
    tree["task"] = "ppo"
    tree["ppo"] = {"rewards": ["helpers:starts_with_the"], "max_new_tokens": 6, "ppo_epochs": 4}
    run = run_ppo(build_config(tree))
    records = [r for r in read_metrics(run.run_dir) if "reward" in r]
    rewards = [r["reward"] for r in records]
    before, last = rewards[0], sum(rewards[-3:]) / 3
    print(f"PPO mean reward: first batch (before any update) {before:.3f}, last 3 batches {last:.3f}: {rewards}")
    assert last > before + 0.2, rewards
    assert all(math.isfinite(r["kl"]) for r in records) and records[-1]["kl"] > 0
