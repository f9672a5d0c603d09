"""Every shipped training config (configs/**/*.yaml but `methods compare` and `sweep` files) trains the embedded
SmolLM2-135M-Instruct for 2 optimizer steps through `tunesmith train`, with its own data and method,
and leaves a finished run folder; every shipped sweep file validates with each trial config it can make;
the example data are what examples/make_example_data.py writes.

The overrides only shrink the run (steps, batch, sequence and completion lengths, no eval, checkpoint
or tracker): the task, the method, the data files and every other setting are the shipped ones.
Planted once each, and caught: a final save that writes no model/ (the run reads as "incomplete
(step 2)", not "finished"), and a NaN loss logged at step 2.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml

from helpers import read_metrics
from tunesmith.cli.main import main
from tunesmith.config.load import load_config
from tunesmith.config.sweep import load_sweep
from tunesmith.runs import read_run

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def shipped_yamls() -> list[Path]:
    """Every YAML under configs/ (subfolders too)."""
    return sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "configs").rglob("*.yml"))


def training_configs() -> list[Path]:
    """Every YAML under configs/ (subfolders too) that is a training config, not a compare or sweep file."""
    return [p for p in shipped_yamls() if not {"methods", "params"} & set(yaml.safe_load(p.read_text()) or {})]


def sweep_files() -> list[Path]:
    """Every `tunesmith sweep` file under configs/ (subfolders too): the YAMLs with search params."""
    return [p for p in shipped_yamls() if "params" in (yaml.safe_load(p.read_text()) or {})]


# Small enough that each example trains in seconds on 2 CPU cores; valid for every task. No held-out
# rows: scoring them at the end took longer than the 2 steps (34 s for DPO's 30 pairs); the recipes'
# own tests cover evaluation.
SHRINK = ["training.max_steps=2", "training.batch_size=2", "training.grad_accum=1", "training.eval_every=null",
          "training.save_every=null", "training.log_every=1", "data.max_seq_len=128", "data.eval_fraction=0",
          "eval.samples=0", "tracking.backends=[]"]
SHRINK_TASK = {
    "grpo": ["grpo.group_size=2", "grpo.max_new_tokens=16"],
    # One batch of rollouts, two optimizer steps on it.
    "ppo": ["ppo.max_new_tokens=16", "ppo.ppo_epochs=2", "ppo.minibatches=1"],
    "online_dpo": ["online_dpo.max_new_tokens=16"],
}
# What one config needs beyond its task's: the calculator's instructions and tools take 350 tokens.
SHRINK_CONFIG = {"grpo_tools.yaml": ["data.max_seq_len=512", "grpo.max_turns=2", "grpo.max_new_tokens=8"]}
# What each task adds to the step records in metrics.jsonl.
STEP_METRICS = {"dpo": ("rewards/accuracy", "rewards/margin"), "reward": ("rewards/accuracy", "rewards/margin"),
                "grpo": ("reward", "kl", "completion_tokens"), "ppo": ("reward", "policy_loss", "value_loss"),
                "online_dpo": ("reward", "tie_share", "completion_tokens")}


def test_configs_cover_every_task_and_the_main_methods():
    shipped = {(c.task, c.method.type) for c in map(load_config, training_configs())}
    assert {task for task, _ in shipped} == {"sft", "pretrain", "dpo", "reward", "grpo", "ppo", "online_dpo"}
    assert {method for task, method in shipped if task == "sft"} >= {"lora", "qlora", "full", "freeze"}


@pytest.mark.parametrize("path", sweep_files(), ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_sweep_file_validates(path):
    """The sweep file and every trial config it can make (load_sweep builds them: each param at both ends of
    its range and at each choice, each enqueued set) validate; its base is a shipped training config."""
    plan = load_sweep(path)
    assert plan.base in training_configs() and plan.study == path.stem


def test_the_example_data_is_what_the_generator_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_example_data", EXAMPLES / "make_example_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["math.jsonl", "pairs.jsonl", "pretrain.jsonl"]
    for name in written:
        assert (tmp_path / name).read_bytes() == (EXAMPLES / "data" / name).read_bytes(), (
            f"examples/data/{name} differs from what examples/make_example_data.py writes; run it again")


@pytest.mark.slow
@pytest.mark.parametrize("path", training_configs(), ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_shipped_config_trains_two_steps(path, embedded_dir, tmp_path, capsys):
    task = load_config(path).task
    overrides = [f"output.dir={tmp_path}", *SHRINK, *SHRINK_TASK.get(task, []), *SHRINK_CONFIG.get(path.name, [])]
    config = load_config(path, overrides)
    assert config.model.name_or_path == "embedded"

    assert main(["train", str(path), *overrides]) == 0, capsys.readouterr().err

    run_dir = tmp_path / config.run_name
    run = read_run(run_dir)
    assert run.status == "finished", run.status
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["method"] == config.method.type
    assert math.isfinite(summary["final_train_loss"])
    assert 0 < summary["trainable_parameters"] <= summary["total_parameters"]
    steps = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps), steps
    for key in STEP_METRICS.get(task, ()):  # PPO logs its rollouts' numbers at a batch's first step only
        values = [r[key] for r in steps if key in r]
        assert values and all(math.isfinite(v) for v in values), (key, steps)

    model = run_dir / "model"
    adapter = config.method.type in ("lora", "dora", "qlora")
    assert (model / ("adapter_config.json" if adapter else "config.json")).is_file()
    assert any(model.glob("*.safetensors")) and (model / "tokenizer_config.json").is_file()
    if task == "ppo":
        assert (run_dir / "value_head" / "value_head.safetensors").is_file()
