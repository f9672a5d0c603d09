"""eval.samples: replies to fixed prompts logged at each eval during training."""

import pytest

from tunesmith.config.load import build_config
from tunesmith.errors import ConfigError
from tunesmith.generate.sample import SamplingConfig, sample_batch
from tunesmith.models.inference import load_for_inference
from tunesmith.recipes.sft import run_sft
from helpers import read_metrics, tiny_tree


def test_samples_are_logged_at_each_eval_and_are_the_model_s_greedy_replies(tiny_model_dir, chat_file, tmp_path):
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", max_steps=20, eval_every=10)
    tree["data"]["eval_fraction"] = 0.25
    tree["eval"] = {"samples": 2, "max_new_tokens": 8}
    run = run_sft(build_config(tree))
    logged = [r for r in read_metrics(run.run_dir) if "samples" in r]
    assert [r["step"] for r in logged] == [10, 20]
    assert all(len(r["samples"]) == 2 for r in logged)
    assert logged[0]["samples"][0]["prompt"] == logged[1]["samples"][0]["prompt"]  # fixed prompts
    first = logged[-1]["samples"][0]
    assert "Count to" in first["prompt"] and first["prompt"].rstrip().endswith("assistant")
    model, tokenizer = load_for_inference(str(run.run_dir), "cpu")  # the final model says the same
    ids = tokenizer(first["prompt"], add_special_tokens=False)["input_ids"]
    reply = sample_batch(model, tokenizer, [ids], SamplingConfig(max_new_tokens=8, temperature=0.0))[0]
    assert tokenizer.decode(reply, skip_special_tokens=True) == first["reply"]


def test_samples_need_evals(tiny_model_dir, chat_file, tmp_path):
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs")
    tree["eval"] = {"samples": 2}
    with pytest.raises(ConfigError, match="eval.samples needs training.eval_every"):
        build_config(tree)
