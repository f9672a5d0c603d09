"""DeepSpeed's configuration as tunesmith writes it, and what is refused before anything loads. The runs
themselves (two processes on the gloo backend) are in tests/distributed/test_ddp.py."""

import pytest

from tunesmith.config.load import build_config
from tunesmith.config.schema import TrainingConfig
from tunesmith.errors import ConfigError
from tunesmith.train import zero
from survive import task_tree


def test_the_configuration_follows_the_training_section():
    training = TrainingConfig(batch_size=3, grad_accum=4, max_grad_norm=0.5, distributed="deepspeed",
                              deepspeed={"stage": 3, "offload_optimizer": True, "offload_params": True})
    config = zero.deepspeed_config(training, processes=4, mixed_precision="bf16")
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["train_batch_size"] == 12
    assert config["gradient_accumulation_steps"] == 1, "the loop accumulates; DeepSpeed must not scale the loss"
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True} and config["fp16"]["enabled"] is False
    optimization = config["zero_optimization"]
    assert optimization["stage"] == 3 and optimization["stage3_gather_16bit_weights_on_model_save"] is True
    assert optimization["offload_optimizer"]["device"] == optimization["offload_param"]["device"] == "cpu"
    plain = zero.deepspeed_config(TrainingConfig(max_grad_norm=None, distributed="deepspeed"), 2, "no")
    assert plain["zero_optimization"] == {"stage": 2, "contiguous_gradients": True, "overlap_comm": False}
    assert plain["gradient_clipping"] == 0.0 and not plain["bf16"]["enabled"]


@pytest.mark.parametrize("change, message", [
    (lambda tree: tree.update(task="grpo", grpo={"rewards": ["helpers:text_length"]}),
     "task grpo is not run under DeepSpeed"),
    (lambda tree: tree["method"].update(type="qlora"), "method qlora is not run under DeepSpeed"),
    (lambda tree: tree["training"].update(keep_best=True), "training.keep_best: not under DeepSpeed"),
    (lambda tree: tree["training"].update(deepspeed={"offload_params": True}), "offload_params needs stage 3"),
    (lambda tree: tree["training"].update(optimizer="adamw_8bit", deepspeed={"offload_optimizer": True}),
     "cannot be offloaded"),
])
def test_what_deepspeed_does_not_run_is_refused_in_the_config(change, message, tiny_model_dir, tmp_path):
    tree = task_tree("sft", tiny_model_dir, tmp_path)
    tree["training"]["distributed"] = "deepspeed"
    tree["data"]["eval_fraction"] = 0.25
    change(tree)
    with pytest.raises(ConfigError, match=message):
        build_config(tree)


def test_without_deepspeed_installed_the_run_is_refused_with_the_install_command(monkeypatch):
    monkeypatch.setattr(zero.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'tunesmith\[deepspeed\]'"):
        zero.require_installed()
