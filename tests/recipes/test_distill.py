"""task: distill: a tiny student learns a tiny teacher (other random weights, the same tokenizer): its
held-out divergence to the teacher falls; on-policy batches sample the student's own replies; a
teacher with another tokenizer is refused before the run folder exists."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tunesmith.config.load import build_config
from tunesmith.errors import ConfigError
from tunesmith.recipes.base import build_training_data, eval_batches_of
from tunesmith.losses.distill import at_labels, distill_loss_sum
from tunesmith.recipes.distill import collate_with_prompts, run_distill
from helpers import counting_rows, read_metrics, tiny_tree, write_jsonl


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Llama's shape with weights of std 0.1: softer distributions than the shared tiny model's
    (std 0.3, nearly one-hot), between which a divergence is smooth enough to descend in a few steps."""
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.1
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("student")
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, student_dir):
    """The student with every weight moved by noise (a model it can reach, as a fine-tuned relative is),
    and the same tokenizer."""
    torch.manual_seed(7)
    teacher = LlamaForCausalLM.from_pretrained(student_dir)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    folder = tmp_path_factory.mktemp("teacher")
    teacher.save_pretrained(folder)
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(folder)
    return folder


def distill_tree(model_dir, teacher_dir, tmp_path, **distill):
    train = write_jsonl(tmp_path / "train.jsonl", counting_rows(24))
    held_out = write_jsonl(tmp_path / "eval.jsonl", [
        {"messages": [{"role": "user", "content": f"Please count up to {n}, slowly."},
                      {"role": "assistant", "content": ", ".join(str(i) for i in range(1, n + 1))}]}
        for n in range(3, 9)])
    tree = tiny_tree(model_dir, train, tmp_path / "runs", "full", max_steps=24, batch_size=4, lr=3e-3)
    tree["task"] = "distill"
    tree["data"]["eval"] = str(held_out)
    tree["distill"] = {"teacher": str(teacher_dir), **distill}
    return tree


def held_out_divergence(config, student_dir, teacher_dir) -> float:
    """The mean forward KL per reply token from the teacher to the student over the held-out rows, the
    whole vocabulary, computed here from both models' logits (not through the recipe's objective)."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    _, eval_rows, _ = build_training_data(config, tokenizer)
    batches = eval_batches_of(eval_rows, 4, lambda rows: collate_with_prompts(rows, tokenizer.pad_token_id))
    teacher = LlamaForCausalLM.from_pretrained(teacher_dir).eval()
    student = LlamaForCausalLM.from_pretrained(student_dir).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            teacher_at = at_labels(teacher(**inputs).logits, batch["labels"])
            total += float(distill_loss_sum(student(**inputs).logits, teacher_at, batch["labels"], "forward_kl"))
            tokens += int((batch["labels"][:, 1:] != -100).sum())
    return total / tokens


@pytest.mark.parametrize("loss", ["jsd"])  # forward_kl: 0.5937 -> 0.1119 the same way (the divergences' own tests cover it)
def test_distillation_lowers_the_students_held_out_divergence(student_dir, teacher_dir, tmp_path, loss):
    """24 steps of full fine-tuning: the held-out forward KL to the teacher (rows whose prompts are in no
    training row; measured here, not by the recipe) falls under 30% of where it started (to 19% here). Planted
    defect seen failing: the teacher's logits one position off the student's in the recipe."""
    config = build_config(distill_tree(student_dir, teacher_dir, tmp_path, loss=loss))
    before = held_out_divergence(config, student_dir, teacher_dir)
    run = run_distill(config)
    after = held_out_divergence(config, run.run_dir / "model", teacher_dir)
    print(f"{loss}: held-out divergence {before:.4f} -> {after:.4f}")
    assert after < 0.3 * before, (before, after)
    losses = [r["loss"] for r in read_metrics(run.run_dir) if "loss" in r]
    assert losses[-1] < losses[0]


def test_on_policy_batches_sample_the_students_own_replies(student_dir, teacher_dir, tmp_path, monkeypatch):
    """λ = 1: every training micro-batch is the student's sampled replies to the rows' prompts, scored by
    the teacher; the dataset's replies are not used."""
    from tunesmith.recipes import distill

    seen = []
    original = distill.DistillObjective._sampled

    def spy(self, model, batch):
        sampled = original(self, model, batch)
        seen.append((batch["input_ids"].shape, sampled["input_ids"].shape))
        return sampled

    monkeypatch.setattr(distill.DistillObjective, "_sampled", spy)
    tree = distill_tree(student_dir, teacher_dir, tmp_path, on_policy=1.0, max_new_tokens=5, loss="reverse_kl",
                        top_k=32)  # the teacher's top 32, taken from its hidden states a chunk at a time
    tree["training"].update(max_steps=3, log_every=1)
    run = run_distill(build_config(tree))
    assert len(seen) == 3
    assert [r["on_policy_share"] for r in read_metrics(run.run_dir) if "on_policy_share" in r] == [1.0, 1.0, 1.0]


def test_a_teacher_with_another_tokenizer_is_refused_before_the_run_folder(tiny_model_dir, tmp_path):
    other = tmp_path / "other-teacher"
    LlamaForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(other)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    tree = distill_tree(tiny_model_dir, other, tmp_path)
    with pytest.raises(ConfigError, match="distill.teacher: .*tokenizer is not the student's"):
        run_distill(build_config(tree))
    assert not (tmp_path / "runs").exists()
