"""The methods beyond LoRA: prefix, prompt, IA3, bottleneck adapters, gradual unfreezing, layer decay,
LoRA+, added tokens. Each trains a tiny model, changes only what it owns, and reloads identically."""

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.config.load import build_config
from tunesmith.models.inference import load_for_inference
from tunesmith.recipes.sft import run_sft
from tunesmith.train.optim import build_optimizer, lr_scale_for
from helpers import read_metrics, tiny_tree, write_jsonl

# method -> (config overrides of method.*, learning rate, the substring every trainable name has)
METHODS = {
    "prefix": ({"prefix": {"num_virtual_tokens": 8}}, 3e-1, "prompt_encoder"),
    "prompt": ({"prompt": {"num_virtual_tokens": 8, "init_text": "Count the numbers in order"}}, 1e-1,
               "prompt_encoder"),
    "ia3": ({}, 1e-1, "ia3_l"),
    "adapter-houlsby": ({"adapter": {"style": "houlsby", "reduction_factor": 4}}, 1e-2, "adapter"),
    "adapter-pfeiffer": ({"adapter": {"style": "pfeiffer", "reduction_factor": 4}}, 1e-2, "adapter"),
}


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def logits_of(model, tokenizer, text="Count to 5."):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -ids.shape[1]:]


@pytest.mark.parametrize("name", list(METHODS))
def test_method_learns_changes_only_its_parameters_and_reloads(tiny_model_dir, chat_file, tmp_path, name):
    extra, lr, owned = METHODS[name]
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", name.split("-")[0], lr=lr)
    tree["method"].update(extra)
    run = run_sft(build_config(tree))
    curve = losses(run.run_dir)
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last < 0.9 * first, f"{name}: loss {first:.3f} -> {last:.3f}"

    trainable = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert trainable and all(owned in n for n in trainable), trainable[:5]
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    base = run.model.get_base_model() if hasattr(run.model, "get_base_model") else run.model
    unchanged = 0
    for key, tensor in base.state_dict().items():
        key = key.replace(".base_layer", "").replace(".base.", ".")
        if key in before:
            assert torch.equal(tensor, before[key]), f"{name} changed base weight {key}"
            unchanged += 1
    assert unchanged >= len(before) - 1

    model, tokenizer = load_for_inference(str(run.run_dir), "cpu")
    assert torch.equal(logits_of(model, tokenizer), logits_of(run.model, tokenizer))


def test_gradual_unfreezing_holds_lower_blocks_until_their_step(tiny_model_dir, chat_file, tmp_path):
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = {}
    for steps in (4, 6):
        tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / f"runs-{steps}", "freeze", max_steps=steps)
        tree["method"]["freeze"] = {"last_n_layers": 1, "unfreeze_every": 4}
        state = run_sft(build_config(tree)).model.state_dict()
        moved[steps] = {layer: not torch.equal(state[f"model.layers.{layer}.mlp.up_proj.weight"],
                                               before[f"model.layers.{layer}.mlp.up_proj.weight"])
                        for layer in (0, 1)}
        assert torch.equal(state["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    # Steps 0-3 train the top block only; block 0 joins at step 4.
    assert moved[4] == {0: False, 1: True} and moved[6] == {0: True, 1: True}


def test_layer_decay_and_lora_plus_learning_rates(tiny_model_dir, chat_file, tmp_path):
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", "full", lr=1e-3, layer_decay=0.5)
    config = build_config(tree)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = build_optimizer(model, config.training, lr_scale_for(config, 2))
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert rate[id(named["model.layers.1.self_attn.q_proj.weight"])] == pytest.approx(5e-4)
    assert rate[id(named["model.layers.0.self_attn.q_proj.weight"])] == pytest.approx(2.5e-4)
    assert rate[id(named["model.embed_tokens.weight"])] == pytest.approx(1.25e-4)
    assert rate[id(named["model.norm.weight"])] == pytest.approx(1e-3)
    decays = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decays[id(named["model.norm.weight"])] == 0.0

    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", "lora", lr=1e-3, weight_decay=0.1)
    tree["method"]["lora"]["lr_ratio"] = 16
    config = build_config(tree)
    run = run_sft(config.model_copy(update={"training": config.training.model_copy(update={"max_steps": 2})}))
    optimizer = build_optimizer(run.model, config.training, lr_scale_for(config, 2))
    for group in optimizer.param_groups:
        names = {n for n, p in run.model.named_parameters() if any(p is q for q in group["params"])}
        expected = 1.6e-2 if all("lora_B" in n for n in names) else 1e-3
        assert group["lr"] == pytest.approx(expected), names


def test_added_tokens_train_alone_and_reload(tiny_model_dir, chat_file, tmp_path):
    new = ["<count>", "<numbers>", "<stop_here>"]
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", "lora", max_steps=12)
    tree["model"]["add_tokens"] = new
    rows = [{"messages": [{"role": "user", "content": f"<count> to {n}"},
                          {"role": "assistant", "content": "<numbers> " + " ".join(map(str, range(1, n + 1)))
                           + " <stop_here>"}]} for n in range(2, 10)]
    from helpers import write_jsonl

    tree["data"]["train"] = str(write_jsonl(tmp_path / "vocab.jsonl", rows))
    run = run_sft(build_config(tree))
    model, tokenizer = load_for_inference(str(run.run_dir), "cpu")
    ids = [tokenizer.convert_tokens_to_ids(t) for t in new]
    assert all(tokenizer("a <count> b", add_special_tokens=False)["input_ids"].count(i) == 1 for i in ids[:1])
    assert tokenizer.tokenize("<numbers><stop_here>") == ["<numbers>", "<stop_here>"]
    before = load_file(str(tiny_model_dir / "model.safetensors"))["model.embed_tokens.weight"]
    merged = model.merge_and_unload().get_input_embeddings().weight
    assert merged.shape[0] == before.shape[0] + 3
    assert torch.equal(merged[:before.shape[0]], before), "LoRA: the old vocabulary's rows must not move"
    assert all(not torch.equal(merged[i], run_start_row) for i, run_start_row in
               zip(ids, initial_rows(tiny_model_dir, new)))
    reloaded, _ = load_for_inference(str(run.run_dir), "cpu")
    assert torch.equal(logits_of(reloaded, tokenizer, "<count> to 3"), logits_of(run.model, tokenizer, "<count> to 3"))


def initial_rows(model_dir, tokens):
    """Where the new rows start: the mean of their sub-token rows under the old tokenizer."""
    from transformers import AutoTokenizer

    old = AutoTokenizer.from_pretrained(model_dir)
    weight = load_file(str(model_dir / "model.safetensors"))["model.embed_tokens.weight"]
    return [weight[old(t, add_special_tokens=False)["input_ids"]].mean(0) for t in tokens]


def test_resume_is_exact_with_replay_gradual_unfreezing_and_layer_decay(tiny_model_dir, chat_file, tmp_path):
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": f"General sentence number {i}."} for i in range(7)])
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", "freeze", max_steps=6, save_every=3,
                     layer_decay=0.7, weight_decay=0.1)
    tree["method"]["freeze"] = {"last_n_layers": 1, "unfreeze_every": 2, "train_lm_head": True}
    tree["data"]["replay"] = {"path": str(general), "share": 0.25}
    config = build_config(tree)
    first = run_sft(config)
    uninterrupted = {k: v.clone() for k, v in first.model.state_dict().items()}
    curve = losses(first.run_dir)
    resumed = run_sft(config, resume=True)  # from the step-3 checkpoint: steps 4-6 again
    for name, tensor in resumed.model.state_dict().items():
        torch.testing.assert_close(tensor, uninterrupted[name], rtol=0, atol=1e-6, msg=name)
    assert losses(resumed.run_dir) == pytest.approx(curve, abs=1e-6)
