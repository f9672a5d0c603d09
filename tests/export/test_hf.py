"""Export to a merged transformers folder, checked against the training-time model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunesmith.config.load import build_config
from tunesmith.export import parity
from tunesmith.export.hf import ExportError, export_hf
from tunesmith.models.inference import load_for_inference
from tunesmith.recipes.sft import run_sft
from helpers import tiny_tree


def trained_run(tiny_model_dir, chat_file, tmp_path, method):
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", method, max_steps=8)
    tree["method"]["lora"]["dropout"] = 0.0
    return run_sft(build_config(tree)).run_dir


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merged_logits_equal_adapter_logits(tiny_model_dir, chat_file, tmp_path, method):
    run_dir = trained_run(tiny_model_dir, chat_file, tmp_path, method)
    result = export_hf(str(run_dir), tmp_path / "merged")
    assert result.merged and result.parity.greedy_agreement == 1.0
    adapter_model, tokenizer = load_for_inference(str(run_dir), "cpu")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(part in name for name in merged.state_dict() for part in ("lora_", "ia3_"))
    ids = tokenizer("Count to 5.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = adapter_model(ids).logits  # (1, seq, vocab)
        difference = float((merged(ids).logits - expected).abs().max())
    # The merged weight W + s*B@A is itself rounded to fp32, so the difference is a few fp32 steps of
    # the activations' size: bounded at 1e-5 of the largest logit (measured: about 1e-6).
    scale = float(expected.abs().max())
    assert difference / scale < 1e-5, f"max |difference| {difference:.3g} for logits up to {scale:.3g}"
    saved = json.loads((tmp_path / "merged" / "parity.json").read_text())
    assert saved["max_abs_logit_diff"] / scale < 1e-5
    assert merged.generation_config.eos_token_id == tokenizer.eos_token_id


def test_failed_parity_writes_nothing(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    run_dir = trained_run(tiny_model_dir, chat_file, tmp_path, "lora")
    monkeypatch.setitem(parity.THRESHOLDS, "float32", (0.0, 1.01))  # impossible to meet
    with pytest.raises(ExportError, match="parity check failed"):
        export_hf(str(run_dir), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".tmp-out-*"))


def test_qlora_merges_into_the_dequantized_base_and_reports_parity(tiny_model_dir, chat_file, tmp_path):
    run_dir = trained_run(tiny_model_dir, chat_file, tmp_path, "qlora")
    result = export_hf(str(run_dir), tmp_path / "merged")
    assert result.merged and not result.parity_enforced and result.parity.positions > 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.float32 and getattr(merged.config, "quantization_config", None) is None


@pytest.mark.parametrize(("method", "why"), [("prompt", "virtual tokens are inputs"),
                                             ("adapter", "extra non-linear layers")])
def test_unmergeable_runs_and_adapter_folders_are_refused(tiny_model_dir, chat_file, tmp_path, method, why):
    run_dir = run_sft(build_config(tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", method,
                                             max_steps=1))).run_dir
    for target in (run_dir, run_dir / "model"):  # the run, and its adapter folder given directly
        with pytest.raises(ExportError, match=f"cannot be merged into plain weights .*{why}"):
            export_hf(str(target), tmp_path / "out")
        assert not (tmp_path / "out").exists()
