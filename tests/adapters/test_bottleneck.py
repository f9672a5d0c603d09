"""Bottleneck adapters on a tiny random Llama, on CPU: identity at init, counts, training, save and load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tunesmith.adapters.bottleneck import (
    BOTTLENECK_CONFIG,
    BOTTLENECK_WEIGHTS,
    AdaptedSublayer,
    BottleneckAdapter,
    add_bottleneck_adapters,
    bottleneck_state_dict,
    is_bottleneck,
    load_bottleneck,
    read_bottleneck_config,
    save_bottleneck,
)
from tunesmith.config.schema import AdapterConfig
from tunesmith.errors import ConfigError, ModelLoadError

HIDDEN = 32
STYLES = ("pfeiffer", "houlsby")


def tiny_llama() -> LlamaForCausalLM:
    """The same 2-layer random Llama on every call (seeded), in eval mode, eager attention."""
    config = LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("eager")
    return model.eval()


def batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (4, 16), generator=generator)  # (batch, seq)


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # (batch, seq, vocab)


def next_token_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits  # (batch, seq, vocab)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def randomise_adapters(model: torch.nn.Module) -> None:
    """Give every adapter weight a non-trivial value, so that a lost weight shows in the logits."""
    with torch.no_grad():
        for tensor in bottleneck_state_dict(model).values():
            tensor.normal_(std=0.5)


def stable_names(style: str, layers: int = 2) -> set[str]:
    names = {"pfeiffer": ["mlp_adapter"], "houlsby": ["attn_adapter", "mlp_adapter"]}[style]
    return {f"layers.{i}.{adapter}.{part}.{kind}" for i in range(layers) for adapter in names
            for part in ("norm", "down", "up") for kind in ("weight", "bias")}


@pytest.mark.parametrize("style", STYLES)
def test_fresh_adapters_leave_logits_unchanged(style: str) -> None:
    ids = batch()
    expected = logits_of(tiny_llama(), ids)
    model = add_bottleneck_adapters(tiny_llama(), AdapterConfig(style=style, reduction_factor=16))
    assert is_bottleneck(model)
    assert torch.equal(logits_of(model, ids), expected)


def test_attention_tuple_passes_through_and_attributes_stay_reachable() -> None:
    ids = batch()
    with torch.no_grad():
        expected = tiny_llama()(input_ids=ids, output_attentions=True).attentions
        model = add_bottleneck_adapters(tiny_llama(), AdapterConfig(style="houlsby"))
        attentions = model(input_ids=ids, output_attentions=True).attentions
    assert len(attentions) == 2 and all(torch.equal(a, b) for a, b in zip(attentions, expected))
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn, AdaptedSublayer) and isinstance(layer.mlp, AdaptedSublayer)
    assert layer.self_attn.layer_idx == 1
    assert layer.mlp.gate_proj is layer.mlp.base.gate_proj


@pytest.mark.parametrize(("style", "adapters"), [("pfeiffer", 2), ("houlsby", 4)])
def test_trainable_parameters_are_exactly_the_adapters(style: str, adapters: int) -> None:
    base_total = sum(p.numel() for p in tiny_llama().parameters())
    model = add_bottleneck_adapters(tiny_llama(), AdapterConfig(style=style, reduction_factor=16))
    width = HIDDEN // 16
    per_adapter = 2 * HIDDEN + (HIDDEN * width + width) + (width * HIDDEN + HIDDEN)  # norm + down + up
    assert per_adapter == 226
    found = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert len(found) == adapters
    assert trainable == adapters * per_adapter
    assert sum(p.numel() for p in model.parameters()) == base_total + trainable
    assert set(bottleneck_state_dict(model)) == stable_names(style)


@pytest.mark.parametrize("style", STYLES)
def test_training_moves_only_the_adapters(style: str) -> None:
    base = tiny_llama()
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    model = add_bottleneck_adapters(base, AdapterConfig(style=style, reduction_factor=16)).train()
    adapters_before = {name: tensor.clone() for name, tensor in bottleneck_state_dict(model).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # all of them: frozen ones must stay put
    ids = batch()
    losses = []
    for _ in range(30):
        loss = next_token_loss(model, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    after = {name.replace(".base.", "."): tensor for name, tensor in model.state_dict().items()
             if "adapter." not in name}
    assert set(after) == set(before)
    changed_base = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed_base == []
    unchanged = [name for name, tensor in bottleneck_state_dict(model).items()
                 if torch.equal(tensor, adapters_before[name])]
    assert unchanged == []


def save_randomised(tmp_path: Path, style: str = "houlsby") -> tuple[Path, torch.Tensor]:
    """A saved adapter with non-trivial weights, and the logits of the model it was saved from."""
    model = add_bottleneck_adapters(tiny_llama(), AdapterConfig(style=style, reduction_factor=16,
                                                                non_linearity="gelu"))
    randomise_adapters(model)
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_bottleneck(model, folder, base_model_name_or_path="tiny-llama")
    return folder, logits_of(model, batch())


@pytest.mark.parametrize("style", STYLES)
def test_save_then_load_reproduces_logits(tmp_path: Path, style: str) -> None:
    folder, expected = save_randomised(tmp_path, style)
    assert sorted(p.name for p in folder.iterdir()) == sorted([BOTTLENECK_CONFIG, BOTTLENECK_WEIGHTS])
    assert set(load_file(folder / BOTTLENECK_WEIGHTS)) == stable_names(style)
    record = read_bottleneck_config(folder)
    assert record == {"style": style, "reduction_factor": 16, "non_linearity": "gelu", "dropout": 0.0,
                      "base_model_name_or_path": "tiny-llama", "hidden_size": HIDDEN, "num_layers": 2,
                      "format_version": 1}
    base_logits = logits_of(tiny_llama(), batch())
    assert not torch.allclose(expected, base_logits)
    loaded = load_bottleneck(tiny_llama(), folder)
    assert not loaded.training
    assert torch.equal(logits_of(loaded, batch()), expected)


def test_save_needs_an_existing_folder(tmp_path: Path) -> None:
    model = add_bottleneck_adapters(tiny_llama(), AdapterConfig())
    with pytest.raises(FileNotFoundError, match="create it before saving"):
        save_bottleneck(model, tmp_path / "absent", base_model_name_or_path="tiny-llama")


def test_load_rejects_a_missing_key(tmp_path: Path) -> None:
    folder, _ = save_randomised(tmp_path)
    weights = load_file(folder / BOTTLENECK_WEIGHTS)
    del weights["layers.1.attn_adapter.up.weight"]
    save_file(weights, str(folder / BOTTLENECK_WEIGHTS))
    base = tiny_llama()
    with pytest.raises(ModelLoadError, match=r"bottleneck_adapter\.safetensors: missing adapter weight "
                                             r"layers\.1\.attn_adapter\.up\.weight"):
        load_bottleneck(base, folder)
    assert not is_bottleneck(base)
    assert not isinstance(base.model.layers[0].mlp, AdaptedSublayer)


def test_load_rejects_an_unexpected_key(tmp_path: Path) -> None:
    folder, _ = save_randomised(tmp_path, style="pfeiffer")
    weights = load_file(folder / BOTTLENECK_WEIGHTS)
    weights["layers.0.attn_adapter.up.bias"] = torch.zeros(HIDDEN)
    save_file(weights, str(folder / BOTTLENECK_WEIGHTS))
    with pytest.raises(ModelLoadError, match=r"unexpected key layers\.0\.attn_adapter\.up\.bias"):
        load_bottleneck(tiny_llama(), folder)


def test_load_rejects_a_config_whose_reduction_factor_does_not_fit_the_weights(tmp_path: Path) -> None:
    folder, _ = save_randomised(tmp_path)
    record = json.loads((folder / BOTTLENECK_CONFIG).read_text())
    record["reduction_factor"] = 8
    (folder / BOTTLENECK_CONFIG).write_text(json.dumps(record))
    with pytest.raises(ModelLoadError, match=r"bottleneck_adapter\.safetensors: layers\.0\.attn_adapter\.down\.weight "
                                             r"has shape \(2, 32\) but .* expects \(4, 32\)"):
        load_bottleneck(tiny_llama(), folder)


def test_load_rejects_a_different_base_and_a_bad_config(tmp_path: Path) -> None:
    folder, _ = save_randomised(tmp_path)
    record = json.loads((folder / BOTTLENECK_CONFIG).read_text())
    (folder / BOTTLENECK_CONFIG).write_text(json.dumps({**record, "num_layers": 3}))
    with pytest.raises(ModelLoadError, match="num_layers is 3 but the base model has 2"):
        load_bottleneck(tiny_llama(), folder)
    (folder / BOTTLENECK_CONFIG).write_text(json.dumps({**record, "style": "sideways"}))
    with pytest.raises(ModelLoadError, match="bottleneck_config.json: invalid adapter config"):
        load_bottleneck(tiny_llama(), folder)
    (folder / BOTTLENECK_CONFIG).unlink()
    with pytest.raises(ModelLoadError, match="bottleneck_config.json: not found"):
        load_bottleneck(tiny_llama(), folder)


def test_adapters_keep_fp32_weights_under_a_bf16_base() -> None:
    model = add_bottleneck_adapters(tiny_llama().to(torch.bfloat16), AdapterConfig(style="houlsby"))
    assert {t.dtype for t in bottleneck_state_dict(model).values()} == {torch.float32}
    assert logits_of(model, batch()).dtype == torch.bfloat16  # the base's activations keep their dtype


def test_unsupported_models_and_double_application_are_config_errors() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ConfigError, match="no decoder layers at model.model.layers"):
        add_bottleneck_adapters(gpt2, AdapterConfig())
    model = add_bottleneck_adapters(tiny_llama(), AdapterConfig())
    with pytest.raises(ConfigError, match="already has bottleneck adapters"):
        add_bottleneck_adapters(model, AdapterConfig())
    with pytest.raises(ConfigError, match="reduction_factor: 64 leaves no bottleneck"):
        add_bottleneck_adapters(tiny_llama(), AdapterConfig(reduction_factor=64))
