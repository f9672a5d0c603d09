"""bitsandbytes export: a quantized folder that loads with plain from_pretrained and still makes
the trained model's greedy choices."""

import json

import bitsandbytes as bnb
import pytest
from transformers import AutoModelForCausalLM

from tunesmith.config.load import build_config
from tunesmith.export.bnb import export_bnb
from tunesmith.recipes.sft import run_sft
from helpers import counting_rows, tiny_tree, write_jsonl

# The least share of the 320 parity positions where the exported model's greedy token is the
# training-time model's. Measured on the run below on CPU (seeds 0, 1, 2): 4-bit NF4 85.6%,
# 87.2%, 78.8%; 8-bit 98.1% (seed 0); a 4-bit export of the base without the trained adapter
# 0.3%. An untrained tiny model is no test subject: its logits are near ties that 4 bits flip at
# random (16.9% kept, and 11.9% with the adapter dropped).
MIN_GREEDY_AGREEMENT = {8: 0.9, 4: 0.6}


@pytest.fixture(scope="module")
def counting_run(tiny_model_dir, tmp_path_factory):
    """A LoRA run that has learnt the counting rows (it replies "1 2 3 ..." to any prompt): its
    greedy choices have margins that a faithful quantization keeps."""
    folder = tmp_path_factory.mktemp("bnb")
    data = write_jsonl(folder / "train.jsonl", counting_rows())
    tree = tiny_tree(tiny_model_dir, data, folder / "runs", "lora", max_steps=30, lr=2e-2)
    return run_sft(build_config(tree)).run_dir


@pytest.mark.parametrize(("bits", "layer"), [(8, bnb.nn.Linear8bitLt), (4, bnb.nn.Linear4bit)])
def test_bnb_export_loads_quantized_and_keeps_the_greedy_choices(counting_run, tmp_path, bits, layer):
    """The folder loads quantized with a plain from_pretrained, and keeps the trained model's greedy
    token at MIN_GREEDY_AGREEMENT of the parity positions (4-bit has no bound in the export's own
    check, which only reports it). Catches a quantized folder that lost the trained weights: seen
    failing with merge_for_export's merge_and_unload() replaced by unload() (the adapter dropped,
    the base quantized: 4-bit 0.3%, where the old test passed)."""
    result = export_bnb(str(counting_run), tmp_path / "q", bits)
    print(f"bnb-{bits}bit: {result.parity.summary()}")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map={"": "cpu"})
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, layer)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"][f"load_in_{bits}bit"]
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    assert result.parity.positions == 320
    assert result.parity.greedy_agreement >= MIN_GREEDY_AGREEMENT[bits], result.parity.summary()
