"""Tiny models trained end to end on CPU: every method learns, and only what it owns changes."""

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.config.load import build_config
from tunesmith.models.inference import load_for_inference
from tunesmith.recipes.sft import run_sft
from helpers import counting_rows, read_metrics, tiny_tree, write_jsonl


def base_weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.parametrize("method,lr", [("full", 3e-3), ("freeze", 5e-3), ("lora", 1e-2), ("dora", 1e-2),
                                       ("qlora", 1e-2)])
def test_each_method_learns(tiny_model_dir, chat_file, tmp_path, method, lr):
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", method, lr=lr)
    tree["method"]["freeze"] = {"last_n_layers": 1, "train_lm_head": True}
    run = run_sft(build_config(tree))
    curve = losses(run.run_dir)
    assert len(curve) == 30
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last < 0.8 * first, f"{method}: loss {first:.3f} -> {last:.3f}"
    assert (run.run_dir / "model" / ("adapter_config.json" if method in ("lora", "dora", "qlora")
                                     else "model.safetensors")).is_file()
    assert (run.run_dir / "model" / "tokenizer.json").is_file()
    reloaded, tokenizer = load_for_inference(str(run.run_dir), "cpu")  # save -> load: the same model
    ids = tokenizer("Count to 5.", return_tensors="pt")["input_ids"]
    run.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, run.model(ids).logits)


def test_attention_dropout_setting(tiny_model_dir, chat_file, tmp_path):
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", "lora", max_steps=1)
    tree["model"]["attention_dropout"] = 0.2
    run = run_sft(build_config(tree))
    rates = {m.attention_dropout for m in run.model.modules() if hasattr(m, "attention_dropout")
             and isinstance(m.attention_dropout, float)}
    assert rates == {0.2}


def test_lora_changes_only_adapter_parameters(tiny_model_dir, chat_file, tmp_path):
    before = base_weights(tiny_model_dir)
    run = run_sft(build_config(tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", "lora", max_steps=10)))
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    state = run.model.get_base_model().state_dict()
    checked = 0
    for name, tensor in state.items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        key = "model.embed_tokens.weight" if key == "lm_head.weight" else key  # tied
        assert torch.equal(tensor, before[key]), f"base weight {key} changed"
        checked += 1
    assert checked == len(before) + 1
    lora_b = [p for n, p in run.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "LoRA B matrices never moved off zero"


def test_freeze_changes_exactly_the_unfrozen_layer(tiny_model_dir, chat_file, tmp_path):
    before = base_weights(tiny_model_dir)
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", "freeze", max_steps=5)
    tree["method"]["freeze"] = {"last_n_layers": 1}
    run = run_sft(build_config(tree))
    for name, tensor in run.model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embeddings
        changed = not torch.equal(tensor, before[name])
        assert changed == name.startswith("model.layers.1."), name


def test_batch_1x8_equals_batch_8x1(tiny_model_dir, tmp_path):
    """Loss normalised by label tokens over the window: same gradient whatever the micro-batching."""
    rows = counting_rows(16)  # rows of different lengths, so padding differs between the two runs
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    weights = []
    for batch, accum in ((1, 8), (8, 1)):
        tree = tiny_tree(tiny_model_dir, data, tmp_path / f"runs-{batch}", "full", max_steps=2, batch_size=batch,
                         grad_accum=accum, optimizer="sgd", lr=0.5, max_grad_norm=None)
        weights.append(run_sft(build_config(tree)).model.state_dict())
    start = base_weights(tiny_model_dir)
    moved = max((weights[0][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3, "the weights barely moved: the comparison would prove nothing"
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=1e-5, msg=name)
