"""`tunesmith export RUN --to bnb-4bit|bnb-8bit`: a bitsandbytes-quantized transformers folder.

The merged float32 model is saved to a scratch folder and quantized by transformers' own
bitsandbytes integration while loading it (NF4 with double quantization, or LLM.int8()), then
saved; the result loads with a plain ``from_pretrained(folder)``, its quantization config inside.
Parity against the training-time model is checked after loading the folder back: 8-bit must keep
the greedy choice at most positions, 4-bit is reported.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tunesmith.export.hf import ExportResult, verify
from tunesmith.export.merge import merge_for_export
from tunesmith.io import atomic_directory
from tunesmith.models.inference import Target


def quantization_config(bits: int) -> BitsAndBytesConfig:
    if bits == 4:
        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute)
    return BitsAndBytesConfig(load_in_8bit=True)


def export_bnb(target: str | Target, out: Path, bits: int, parity: bool = True) -> ExportResult:
    """Merge ``target`` and write it quantized to ``bits`` (4 or 8) with bitsandbytes at ``out``."""
    prepared = merge_for_export(target, parity)
    device_map = {"": 0 if torch.cuda.is_available() else "cpu"}
    kind = f"bnb-{bits}bit"
    with tempfile.TemporaryDirectory(prefix=".tunesmith-merge-", dir=out.parent if out.parent.exists() else None) \
            as scratch, atomic_directory(out) as staging:
        prepared.model.save_pretrained(scratch, safe_serialization=True)
        quantized = AutoModelForCausalLM.from_pretrained(scratch, quantization_config=quantization_config(bits),
                                                         device_map=device_map)
        quantized.save_pretrained(staging, safe_serialization=True)
        prepared.tokenizer.save_pretrained(staging)
        del quantized
        report = None
        if parity:
            loaded = AutoModelForCausalLM.from_pretrained(staging, device_map=device_map)
            report = verify(loaded, prepared, kind, out, staging / "parity.json")
    return ExportResult(out, kind, prepared.merged, report, parity and not prepared.from_qlora)
