"""task: grpo: the group advantages and the clipped loss by hand; a tiny model's mean reward rises
under a programmatic reward while the KL stays finite; bad reward names fail before training."""

import math

import pytest
import torch

from tunesmith.config.load import build_config
from tunesmith.errors import ConfigError
from tunesmith.losses.rl import group_advantages, grpo_token_loss, k3_kl
from tunesmith.recipes.grpo import run_grpo
from tunesmith.rundir import RunDir
from tunesmith.rewards import gsm8k_exact
from helpers import counting_rows, read_metrics, tiny_tree, write_jsonl


def test_group_advantages_and_clipped_loss_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # mean 0.5, sample std sqrt(1/3)
    advantages = group_advantages(rewards, eps=0.0)
    assert advantages[0, 0].item() == pytest.approx(0.5 / math.sqrt(1 / 3))
    logps = torch.tensor([-1.0, -2.0], requires_grad=True)
    old = torch.tensor([-1.5, -2.1])  # ratios e^0.5 = 1.65 (clipped to 1.2 for A > 0) and e^0.1 = 1.105 (inside)
    reference = torch.tensor([-1.2, -2.0])
    loss = grpo_token_loss(logps, old, reference, torch.tensor([2.0, -1.0]), epsilon=0.2, beta=0.1)
    kl_first = math.exp(-0.2) + 0.2 - 1  # k3 with delta = ref - logp = -0.2
    assert loss[0].item() == pytest.approx(-min(math.exp(0.5) * 2.0, 1.2 * 2.0) + 0.1 * kl_first)
    assert loss[1].item() == pytest.approx(math.exp(0.1))  # -(1.105 * -1); no KL: reference = policy
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0.0
    loss.sum().backward()
    assert logps.grad[0].item() == pytest.approx(0.1 * (1 - math.exp(-0.2)))  # clipped: only the KL pulls
    assert logps.grad[1].item() == pytest.approx(math.exp(0.1))  # A < 0, unclipped: descent lowers this token


def test_gsm8k_reward_on_the_real_answers():
    from pathlib import Path
    import json

    data = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k_train.jsonl"
    if not data.is_file():
        pytest.skip("../shared/data is absent")
    rows = [json.loads(line) for line in data.open()][:20]
    answers = [r["answer"] for r in rows]
    assert gsm8k_exact([[]] * 20, answers, answers) == [1.0] * 20  # every reference grades itself right
    wrong = [a.rsplit("####", 1)[0] + "#### 999999" for a in answers]
    assert gsm8k_exact([[]] * 20, wrong, answers) == [0.0] * 20


PROMPTS = ["Name a color.", "Name an animal.", "Pick a color for my new car.", "Name a fruit.", "Name a city.",
           "Say something about the sea."]


def grpo_tree(model_dir, data, out, **grpo):
    tree = tiny_tree(model_dir, data, out, "lora", max_steps=12, batch_size=2, lr=3e-3)
    tree["task"] = "grpo"
    tree["grpo"] = {"rewards": ["helpers:starts_with_the"], "group_size": 6, "max_new_tokens": 6, "beta": 0.04,
                    **grpo}
    return tree


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["grpo", "dapo", "gspo", "rloo"])
def test_grpo_raises_the_mean_reward(embedded_dir, tmp_path, loss):
    """The embedded model, LoRA, a reward for replies that open with "The": 6 steps of 2 prompts x 4
    completions of at most 3 tokens (bench/grpo_family.py's runs, smaller: the suite's time), each variant
    with its own defaults. The margin, 0.2 of mean reward between the first and the last 3 steps; measured
    0.417 for grpo, gspo and rloo (0.583 to 1.0) and 0.271 for dapo (0.729 to 1.0)."""
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "x"}]} for p in PROMPTS]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    tree = grpo_tree(embedded_dir, data, tmp_path / "runs", loss=loss, max_new_tokens=3, group_size=4)
    if loss in ("dapo", "gspo"):
        del tree["grpo"]["beta"]  # their own default (0)
    tree["training"]["max_steps"] = 6
    run = run_grpo(build_config(tree))
    records = [r for r in read_metrics(run.run_dir) if "reward" in r]
    rewards = [r["reward"] for r in records]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"{loss} mean reward: first 3 steps {first:.3f}, last 3 steps {last:.3f}")
    assert last > first + 0.2, rewards
    if loss in ("grpo", "rloo"):  # the variants with a KL term
        assert all(math.isfinite(r["kl"]) and r["kl"] >= 0 for r in records)
        assert records[-1]["kl"] > 0  # the policy left the reference
    assert (run.run_dir / "model" / "adapter_config.json").is_file()


def test_unknown_reward_fails_before_training(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", counting_rows(4))
    with pytest.raises(ConfigError, match="grpo.rewards: reward 'helpers:nope'"):
        run_grpo(build_config(grpo_tree(tiny_model_dir, data, tmp_path / "runs", rewards=["helpers:nope"])))
    assert not (tmp_path / "runs").exists()


def test_grpo_resumes_the_same_samples(tiny_model_dir, tmp_path):
    """Sampling draws on the RNG the checkpoints keep: steps 3-4 redone from the step-2 checkpoint
    sample the same completions and give the same losses as the first time."""
    data = write_jsonl(tmp_path / "prompts.jsonl", counting_rows(8))
    tree = grpo_tree(tiny_model_dir, data, tmp_path / "runs", max_new_tokens=8, group_size=3)
    tree["training"].update(max_steps=4, save_every=2)
    config = build_config(tree)
    first = run_grpo(config)
    before = [r for r in read_metrics(first.run_dir) if "loss" in r]
    resumed = run_grpo(config, resume=True)
    after = [r for r in read_metrics(resumed.run_dir) if "loss" in r]
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    assert after[:2] == before[:2]  # kept as written, timings too: the run went on from step 2, not from 0
    for old, new in zip(before[2:], after[2:]):
        assert new["completion_tokens"] == old["completion_tokens"]
        assert new["loss"] == pytest.approx(old["loss"], abs=1e-6)


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp"])
def test_every_variant_trains_and_reports(tiny_model_dir, tmp_path, loss):
    """Two steps of each variant on the tiny model (beta 0.04 where the variant keeps a KL): finite
    losses, the variant's own defaults in the saved config, and its metrics."""
    data = write_jsonl(tmp_path / "prompts.jsonl", counting_rows(8))
    tree = grpo_tree(tiny_model_dir, data, tmp_path / "runs", max_new_tokens=6, group_size=3, loss=loss,
                     rewards=["helpers:flat_or_parity"])
    if loss in ("dapo", "gspo"):
        del tree["grpo"]["beta"]  # their own default (0) applies
    tree["training"].update(max_steps=2)
    run = run_grpo(build_config(tree))
    records = [r for r in read_metrics(run.run_dir) if "loss" in r]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    assert all("clip_fraction" in r and "reward" in r for r in records)
    saved = RunDir(run.run_dir).config().grpo
    assert saved.loss == loss
    if loss == "dapo":
        assert (saved.epsilon_high, saved.beta, saved.dynamic_sampling) == (0.28, 0.0, True)
    if loss == "gspo":
        assert (saved.epsilon, saved.epsilon_high) == (3e-4, 4e-4)


def test_several_updates_per_batch_make_the_clip_bind(tiny_model_dir, tmp_path):
    """μ = 3: each sampled batch trains three steps against the sampling policy's log-probabilities, so
    from the second the ratio leaves 1 and the clip (0.02 here) binds; with μ = 1 it never does. The
    three steps of a batch see the same completions (their token counts are equal). Planted defect
    seen failing: the old log-probabilities taken again at each update (the ratio stays 1)."""
    data = write_jsonl(tmp_path / "prompts.jsonl", counting_rows(8))
    fractions = {}
    for updates in (1, 3):
        tree = grpo_tree(tiny_model_dir, data, tmp_path / f"runs{updates}", max_new_tokens=6, group_size=3,
                         epsilon=0.02, updates_per_batch=updates, beta=0.0, rewards=["helpers:flat_or_parity"])
        tree["training"].update(max_steps=6, lr=2e-2)
        records = [r for r in read_metrics(run_grpo(build_config(tree)).run_dir) if "loss" in r]
        fractions[updates] = [r["clip_fraction"] for r in records]
        if updates == 3:
            tokens = [r["completion_tokens"] for r in records]
            assert tokens[0] == tokens[1] == tokens[2] and tokens[3] == tokens[4] == tokens[5]
    assert fractions[1] == [0.0] * 6
    assert fractions[3][0] == fractions[3][3] == 0.0  # the first update of each batch: ratio 1
    assert max(fractions[3][1:3] + fractions[3][4:6]) > 0, fractions[3]


def test_dynamic_sampling_never_trains_on_a_group_without_a_signal(tiny_model_dir, tmp_path, monkeypatch):
    """Half the prompts get a reward that is the same whatever the reply: DAPO drops those groups (and
    those whose replies happen to agree) and refills the batch with other prompts; every group the
    loss sees has rewards that differ. Planted defect seen failing: the groups kept without looking."""
    from tunesmith.recipes.grpo import GRPOObjective

    seen = []
    original = GRPOObjective._loss

    def spy(self, logps, old, reference, rewards, index, completions):
        seen.append(rewards.clone())
        return original(self, logps, old, reference, rewards, index, completions)

    monkeypatch.setattr(GRPOObjective, "_loss", spy)
    rows = [{"messages": [{"role": "user", "content": f"{'Flat' if i % 2 else 'Count'} {i}."},
                          {"role": "assistant", "content": "x"}]} for i in range(8)]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    tree = grpo_tree(tiny_model_dir, data, tmp_path / "runs", max_new_tokens=6, group_size=4, loss="dapo",
                     rewards=["helpers:flat_or_parity"])
    tree["training"].update(max_steps=4, batch_size=4)
    records = [r for r in read_metrics(run_grpo(build_config(tree)).run_dir) if "loss" in r]
    assert seen and all(float(group.std()) > 0 for rewards in seen for group in rewards)
    assert sum(r.get("dropped_groups", 0) for r in records) >= 2  # the "Flat" prompts of the first batch at least


def test_repeated_batches_hand_out_each_steps_micro_batches_several_times():
    """Two micro-batches a step (grad_accum 1 x 2 processes), three updates each: positions 0-5 are the
    first step's two micro-batches three times, then the next two."""
    from tunesmith.train.loop import RepeatedBatches

    class Stream:
        per_epoch = 4

        def __getitem__(self, position):
            return {"index": torch.tensor([position])}

    repeated = RepeatedBatches(Stream(), 3, per_step=2)
    seen = [(int(repeated[p]["rollout"]), int(repeated[p]["pass"])) for p in range(8)]
    assert seen == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 0), (3, 0)]
    assert repeated.per_epoch == 12 and repeated.checkpoint_every == 3


def test_variant_defaults_yield_to_the_users_clip_and_steps_must_fill_whole_batches(tiny_model_dir, tmp_path):
    from tunesmith.config.schema import GRPOConfig

    assert GRPOConfig(loss="gspo").clip_high == 4e-4
    assert GRPOConfig(loss="dapo", epsilon=0.1).clip_high == 0.1  # not DAPO's 0.28 above a 0.1 below
    assert GRPOConfig(loss="dapo", epsilon=0.1, epsilon_high=0.3).clip_high == 0.3
    data = write_jsonl(tmp_path / "prompts.jsonl", counting_rows(4))
    tree = grpo_tree(tiny_model_dir, data, tmp_path / "runs", updates_per_batch=3)
    tree["training"].update(max_steps=7, save_every=None)
    with pytest.raises(ConfigError, match="max_steps \\(7\\) must be a multiple of grpo.updates_per_batch"):
        build_config(tree)


def test_a_batch_with_nothing_to_learn_still_runs_the_model(tiny_model_dir):
    """A process past the data's end (DDP: marked no_loss), and a dynamic-sampling batch with no signal,
    return a zero loss that went through the model's forward, so DDP's gradient sync still happens."""
    from transformers import LlamaForCausalLM

    from tunesmith.recipes.grpo import GRPOObjective
    from tunesmith.train.loop import _no_loss

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    batch = _no_loss({"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
                      "index": torch.tensor([0])})
    assert int(batch["no_loss"]) == 1
    objective = GRPOObjective.__new__(GRPOObjective)
    objective.config = None
    loss = objective.loss_sum(model, batch)
    loss.backward()
    assert float(loss) == 0.0 and calls and all(float(p.grad.abs().sum()) == 0 for p in model.parameters()
                                                 if p.grad is not None)


@pytest.mark.parametrize("updates", [1, 2])
def test_dynamic_sampling_with_no_signal_anywhere_skips_the_step(tiny_model_dir, tmp_path, caplog, updates):
    """Every group has equal rewards: each step is skipped; with μ = 2 the empty batch is kept for its
    second update too, not sampled again. Planted defect seen failing: the empty batch not kept."""
    rows = [{"messages": [{"role": "user", "content": f"Flat {i}."}, {"role": "assistant", "content": "x"}]}
            for i in range(4)]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    tree = grpo_tree(tiny_model_dir, data, tmp_path / "runs", max_new_tokens=4, group_size=2, loss="dapo",
                     rewards=["helpers:flat_or_parity"], max_resample_rounds=2, updates_per_batch=updates)
    tree["training"].update(max_steps=2, log_every=1, save_every=None)
    tree["training"]["weight_decay"] = 0.1
    run = run_grpo(build_config(tree))
    records = [r for r in read_metrics(run.run_dir) if "loss" in r]
    assert [r["empty_batches"] for r in records] == [1, 1] and all(r["loss"] == 0.0 for r in records)
    assert "sampling it again" not in caplog.text
    if updates == 1:  # not applied: AdamW's weight decay alone would shrink lora_A. The same run at lr 1e-12 is the start.
        from safetensors.torch import load_file
        tree["training"]["lr"], tree["name"] = 1e-12, "start"  # (a step at this rate changes no float32 weight)
        start = load_file(run_grpo(build_config(tree)).run_dir / "model" / "adapter_model.safetensors")
        trained = load_file(run.run_dir / "model" / "adapter_model.safetensors")
        assert any(float(t.abs().sum()) > 0 for t in start.values())
        assert all(torch.equal(trained[name], start[name]) for name in start)


def test_multi_turn_rollouts_train_through_an_environment(tiny_model_dir, tmp_path):
    """grpo.environment: each episode calls the tool once (its prefill), gets the result and replies again;
    the environment's reward trains the policy and the calls and turns are in the metrics."""
    data = write_jsonl(tmp_path / "prompts.jsonl", counting_rows(4))
    tree = grpo_tree(tiny_model_dir, data, tmp_path / "runs", environment="helpers:EchoEnvironment", max_turns=3,
                     group_size=2, max_new_tokens=6)
    del tree["grpo"]["rewards"]
    tree["data"]["max_seq_len"] = 256
    tree["training"].update(max_steps=2)
    run = run_grpo(build_config(tree))
    records = [r for r in read_metrics(run.run_dir) if "loss" in r]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) and r["tool_calls"] == 1.0 for r in records)
    assert all(2.0 <= r["turns"] <= 3.0 and r["env/replies"] > 0 for r in records)


def test_environment_and_engine_settings_are_checked(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", counting_rows(4))
    cases = [({"environment": "helpers:EchoEnvironment"}, "leave grpo.rewards"),
             ({"environment_args": {"x": 1}}, "environment_args and grpo.max_turns are for"),
             ({"max_turns": 2}, "are for grpo.environment, which is not set"),
             ({"vllm_args": ["--dtype", "float32"]}, "are for grpo.engine: vllm"),
             ({"engine": "vllm", "max_turns": 0}, "max_turns"),
             ({"environment": "helpers:EchoEnvironment", "overlong_buffer": 2, "rewards": None}, "overlong_buffer")]
    for grpo, message in cases:
        tree = grpo_tree(tiny_model_dir, data, tmp_path / "runs", **grpo)
        if tree["grpo"]["rewards"] is None:
            del tree["grpo"]["rewards"]
        with pytest.raises(ConfigError, match=message):
            build_config(tree)
    full = grpo_tree(tiny_model_dir, data, tmp_path / "runs", engine="vllm")
    full["method"] = {"type": "full"}
    with pytest.raises(ConfigError, match="method full is not supported with it"):
        build_config(full)
    tree = grpo_tree(tiny_model_dir, data, tmp_path / "runs", environment="helpers:Nope")
    del tree["grpo"]["rewards"]
    with pytest.raises(ConfigError, match="grpo.environment: environment 'helpers:Nope': cannot import"):
        run_grpo(build_config(tree))
    assert not (tmp_path / "runs").exists()
