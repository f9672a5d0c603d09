"""One config model per task: a section of another task is refused with its name, and each default
lives in one place (PPO's reward source)."""

from __future__ import annotations

import re

import pytest
import yaml

from tunesmith.config.load import build_config
from tunesmith.config.schema import DEFAULT_REWARDS, SFTTaskConfig, upgrade_saved_config
from tunesmith.errors import ConfigError
from tunesmith.rundir import RunDir


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("{}\n")
    return str(path)


@pytest.mark.parametrize("task, section, owner", [("sft", "grpo", "grpo"), ("sft", "preference", "dpo"),
                                                  ("reward", "preference", "dpo"), ("dpo", "ppo", "ppo"),
                                                  ("grpo", "regularization", "sft and pretrain"),
                                                  ("dpo", "online_dpo", "online_dpo")])
def test_a_section_of_another_task_is_refused_by_name(data, task, section, owner):
    with pytest.raises(ConfigError) as caught:
        build_config({"task": task, "data": {"train": data}, section: {}})
    assert caught.value.problems == [f"{section}: task {task} does not take a {section} section (it is for task "
                                     f"{owner}); remove it, or set task: {owner.split()[0]}"]


def test_no_task_is_sft_and_an_unknown_task_is_named(data):
    assert isinstance(build_config({"data": {"train": data}}), SFTTaskConfig)
    with pytest.raises(ConfigError, match="task: 'sfft' is invalid: task must be one of sft, pretrain, dpo"):
        build_config({"task": "sfft", "data": {"train": data}})


def test_a_misspelled_field_inside_a_task_section_gets_a_hint(data):
    with pytest.raises(ConfigError, match=r"grpo.group_sise: unknown field .*did you mean 'grpo.group_size'\?"):
        build_config({"task": "grpo", "data": {"train": data}, "grpo": {"group_sise": 4}})


def test_ppo_defaults_to_the_default_reward_with_or_without_its_section(data):
    """Before: no ppo section got the GSM8K reward, but `ppo: {kl_coef: 0.3}` failed with "needs exactly
    one reward source"."""
    bare = build_config({"task": "ppo", "data": {"train": data}})
    tuned = build_config({"task": "ppo", "data": {"train": data}, "ppo": {"kl_coef": 0.3}})
    assert bare.ppo.rewards == tuned.ppo.rewards == list(DEFAULT_REWARDS) and tuned.ppo.kl_coef == 0.3
    grpo = build_config({"task": "grpo", "data": {"train": data}})
    assert grpo.grpo.rewards == list(DEFAULT_REWARDS)  # the same default, from the same place
    model = build_config({"task": "ppo", "data": {"train": data}, "ppo": {"reward_model": "runs/rm"}})
    assert model.ppo.rewards == [] and model.ppo.reward_model == "runs/rm"
    with pytest.raises(ConfigError, match="ppo takes one reward source"):
        build_config({"task": "ppo", "data": {"train": data},
                      "ppo": {"reward_model": "runs/rm", "rewards": ["tunesmith.rewards:gsm8k_exact"]}})


ONE_SOURCE = "online_dpo takes exactly one source of preferences: online_dpo.rewards"


@pytest.mark.parametrize("section, message", [
    (None, "online_dpo: required field is missing"),
    ({}, f"{ONE_SOURCE} .*; none is set"),
    ({"rewards": ["m:f"], "reward_model": "runs/rm"}, f"{ONE_SOURCE} .*; got online_dpo.rewards and "
                                                      "online_dpo.reward_model"),
    ({"reward_model": "runs/rm", "judge": {"url": "http://j/v1", "model": "m"}},
     f"{ONE_SOURCE} .*; got online_dpo.reward_model and online_dpo.judge"),
    ({"reward_model": "runs/rm", "reward_weights": [1.0]}, "online_dpo.reward_weights weigh online_dpo.rewards"),
    ({"rewards": ["m:f"], "reward_weights": [1.0, 2.0]}, "online_dpo.reward_weights has 2 entries for 1 "
                                                         "online_dpo.rewards"),
    ({"judge": {"url": "http://j/v1"}}, "online_dpo.judge.model: required field is missing"),
    ({"judge": {"url": "localhost:8000", "model": "m"}},
     "online_dpo.judge.url: 'localhost:8000' is invalid: .*http://"),
    ({"rewards": ["m:f"], "beta": 0}, "online_dpo.beta: 0 is invalid"),
    ({"rewards": ["m:f"], "loss": "kto"}, "online_dpo.loss: 'kto' is invalid"),
    ({"rewards": ["m:f"], "temperature": 0}, "online_dpo.temperature: 0 is invalid"),
    ({"rewards": ["m:f"], "group_size": 2}, "online_dpo.group_size: unknown field"),
])
def test_online_dpo_config_errors_name_the_field(data, section, message):
    tree = {"task": "online_dpo", "data": {"train": data}, **({"online_dpo": section} if section is not None else {})}
    with pytest.raises(ConfigError) as caught:
        build_config(tree)
    assert len(caught.value.problems) == 1 and re.match(message, caught.value.problems[0]), caught.value.problems


def test_online_dpo_takes_one_source_and_refuses_sharded_training(data):
    config = build_config({"task": "online_dpo", "data": {"train": data},
                           "online_dpo": {"judge": {"url": "http://j/v1", "model": "m"}}})
    assert config.online_dpo.judge.api_key_env == "OPENAI_API_KEY" and config.online_dpo.rewards == []
    with pytest.raises(ConfigError, match="training.distributed fsdp: task online_dpo samples inside each step"):
        build_config({"task": "online_dpo", "data": {"train": data}, "online_dpo": {"rewards": ["m:f"]},
                      "training": {"distributed": "fsdp"}})


def test_the_reward_margin_lives_in_the_reward_section(data):
    assert build_config({"task": "reward", "data": {"train": data}, "reward": {"margin": 0.5}}).reward.margin == 0.5
    with pytest.raises(ConfigError, match="method prefix"):
        build_config({"task": "reward", "data": {"train": data}, "method": {"type": "prefix"}})


def test_a_config_saved_before_per_task_configs_still_reads(tmp_path, data):
    """Run folders of earlier versions hold every task's section at its defaults."""
    old = {"name": "old", "task": "reward", "data": {"train": [{"path": data}]},
           "preference": {"loss": "dpo", "beta": 0.1, "reward_margin": 0.25}, "grpo": {"group_size": 4},
           "ppo": {"rewards": [], "reward_model": None}, "regularization": {"kl_to_base": 0.0}}
    assert upgrade_saved_config(old)["reward"] == {"margin": 0.25}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(old))
    config = RunDir(tmp_path / "run").config()
    assert config.task == "reward" and config.reward.margin == 0.25
    with pytest.raises(ConfigError, match="preference: task reward does not take"):
        build_config(old)  # a config a user writes is not upgraded: the section is named


def test_a_task_that_is_not_a_name_is_a_config_error(data):
    for odd in (["sft"], {"x": 1}, 3):
        with pytest.raises(ConfigError, match="task: .* is invalid: task must be one of"):
            build_config({"task": odd, "data": {"train": data}})


def test_a_saved_config_that_is_not_a_mapping_is_named(tmp_path):
    from tunesmith.errors import TunesmithError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("[1, 2]\n")
    with pytest.raises(TunesmithError, match="config.yaml: not a config"):
        RunDir(tmp_path / "run").config()
