"""bitsandbytes export: a quantized folder that loads with plain from_pretrained."""

import json

import bitsandbytes as bnb
import pytest
from transformers import AutoModelForCausalLM

from tunesmith.config.load import build_config
from tunesmith.export.bnb import export_bnb
from tunesmith.recipes.sft import run_sft
from helpers import tiny_tree


@pytest.mark.parametrize(("bits", "layer"), [(8, bnb.nn.Linear8bitLt), (4, bnb.nn.Linear4bit)])
def test_bnb_export_loads_quantized(tiny_model_dir, chat_file, tmp_path, bits, layer):
    run_dir = run_sft(build_config(tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", max_steps=6))).run_dir
    result = export_bnb(str(run_dir), tmp_path / "q", bits)
    print(f"bnb-{bits}bit: {result.parity.summary()}")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map={"": "cpu"})
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, layer)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"][f"load_in_{bits}bit"]
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    assert result.parity.positions == 320
    if bits == 8:
        assert result.parity.greedy_agreement >= 0.7
