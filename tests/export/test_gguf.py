"""GGUF export: written by our writer, read back by transformers' GGUF loader, compared."""

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, Qwen2Config, \
    Qwen2ForCausalLM

from tunesmith.cli.main import main
from tunesmith.config.load import build_config
from tunesmith.export import parity
from tunesmith.export.gguf import _permute_rows, export_gguf
from tunesmith.export.merge import ExportError, merge_for_export
from tunesmith.recipes.sft import run_sft
from helpers import tiny_tree


def test_permutation_is_what_transformers_loader_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = np.random.default_rng(0).standard_normal((16, 5)).astype(np.float32)  # 2 heads of dim 8
    processor = LlamaTensorProcessor(config={"num_attention_heads": 2, "num_key_value_heads": 2})
    restored = processor.process(_permute_rows(weight, 2), "blk.0.attn_q.weight").weights
    assert np.array_equal(restored, weight)
    assert not np.array_equal(_permute_rows(weight, 2), weight)


def test_lora_run_round_trips_through_gguf_and_ollama(tiny_model_dir, chat_file, tmp_path, capsys):
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", "lora", max_steps=10)
    run_dir = run_sft(build_config(tree)).run_dir
    out = tmp_path / "gguf"
    assert main(["export", str(run_dir), "--to", "ollama", "--quant", "f32,f16,q8_0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    print(printed)
    reports = {q: json.loads((out / f"tiny-{q}.parity.json").read_text()) for q in ("f32", "f16", "q8_0")}
    # f32 against the unmerged adapter model: only the merge's fp32 rounding remains.
    assert reports["f32"]["max_abs_logit_diff"] < 1e-3 and reports["f32"]["greedy_agreement"] == 1.0
    assert reports["f16"]["greedy_agreement"] >= 0.99
    assert reports["q8_0"]["greedy_agreement"] >= 0.8 and "q8_0" in printed
    assert reports["f16"]["positions"] == 20 * 16

    reader = gguf.GGUFReader(out / "tiny-q8_0.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types  # tied head: the loader ties it back
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    fields = reader.fields
    assert bytes(fields["tokenizer.chat_template"].parts[-1]).decode().startswith("{% for message")

    # The f32 file holds exactly the merged weights: the q/k interleaving is undone exactly on load.
    merged = merge_for_export(str(run_dir), parity=False)
    tokenizer = merged.tokenizer
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="tiny-f32.gguf", dtype=torch.float32)
    for name, tensor in merged.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert AutoTokenizer.from_pretrained(out, gguf_file="tiny-f32.gguf").eos_token == tokenizer.eos_token

    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./tiny-f32.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "TEMPLATE" in modelfile


def test_qwen2_with_biases_round_trips(tokenizer, tmp_path):
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_(0, 0.5)  # non-zero biases must survive the trip
    model.save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    _, files = export_gguf(str(tmp_path / "qwen"), tmp_path / "out", ["f32"])
    assert files[0].parity.max_abs_logit_diff < 1e-4 and files[0].parity.greedy_agreement == 1.0
    names = {t.name for t in gguf.GGUFReader(files[0].path).tensors}
    assert {"output.weight", "blk.1.attn_q.bias"} <= names


def test_mistral_round_trips(tokenizer, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    tokenizer.save_pretrained(tmp_path / "mistral")
    _, files = export_gguf(str(tmp_path / "mistral"), tmp_path / "out", ["f32"])
    assert files[0].parity.max_abs_logit_diff < 1e-4
    assert files[0].parity.greedy_agreement == 1.0  # read back as Llama: the same computation


def test_unsupported_architecture_fails_before_writing(tokenizer, tmp_path):
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ExportError, match="GGUF export supports the llama, mistral, qwen2 families; this model is "
                                          "'gpt2'.*--to hf"):
        export_gguf(str(tmp_path / "gpt2"), tmp_path / "out", ["f16"], parity=False)
    assert not (tmp_path / "out").exists()


def test_failed_gguf_parity_writes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(parity.THRESHOLDS, "gguf-f16", (0.0, 1.01))  # impossible to meet
    with pytest.raises(ExportError, match="parity check failed"):
        export_gguf(str(tiny_model_dir), tmp_path / "out", ["f16"])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-out-*"))


@pytest.mark.slow
def test_embedded_smollm2_round_trips_at_f16_and_q8_0(embedded_dir, tmp_path):
    """f32's exact round trip is checked on the tiny models above; here the real model's two shipped quants
    (f32 of the 135M model took a third of this test's 98 s)."""
    _, files = export_gguf("embedded", tmp_path / "out", ["f16", "q8_0"])
    by_quant = {f.quant: f.parity for f in files}
    for quant, report in by_quant.items():
        print(f"embedded SmolLM2-135M GGUF {quant}: {report.summary()}")
    # 20 prompts, up to 16 greedy tokens each (fewer where the model ends its reply).
    assert by_quant["f16"].greedy_agreement >= 0.99 and by_quant["f16"].positions > 200
    assert by_quant["q8_0"].greedy_agreement >= 0.8
