"""`tunesmith export RUN --to hf`: merge the adapter into the base and write a plain transformers folder.

The folder is written into a staging folder, loaded back and compared with the training-time
model (adapter attached); only if parity holds is it moved to its place. A QLoRA adapter is merged
into the de-quantized base (never into 4-bit weights), so its parity against the 4-bit training
model is reported, not enforced.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tunesmith.errors import TunesmithError
from tunesmith.export.parity import ParityReport, check, compare, record_reference
from tunesmith.io import atomic_directory
from tunesmith.models.device import select_dtype
from tunesmith.models.inference import load_for_inference, run_config_of

log = logging.getLogger(__name__)


class ExportError(TunesmithError):
    """An export that failed its parity check; nothing was written."""


@dataclass
class ExportResult:
    out: Path
    dtype: str
    merged: bool
    parity: ParityReport | None
    parity_enforced: bool


def export_hf(target: str, out: Path, dtype: str = "float32", parity: bool = True) -> ExportResult:
    """Merge (if an adapter) and save ``target`` as a transformers folder at ``out``."""
    config = run_config_of(target)
    quantized = config is not None and config.method.type == "qlora"
    model, tokenizer = load_for_inference(target, "cpu")
    reference = record_reference(model, tokenizer) if parity else None
    merged = isinstance(model, PeftModel)
    if merged and quantized:
        log.info("QLoRA run: merging into the de-quantized base in %s (never into the 4-bit weights); parity "
                 "against the 4-bit training model is reported, not enforced", dtype)
        del model
        model, _ = load_for_inference(target, "cpu", dequantize=True)
    if merged:
        model = model.merge_and_unload()
    model = model.to(select_dtype(dtype, torch.device("cpu")))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    report = None
    with atomic_directory(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if reference is not None:
            exported = AutoModelForCausalLM.from_pretrained(staging, dtype=select_dtype(dtype, torch.device("cpu")))
            report = compare(exported, reference)
            problem = None if quantized else check(report, dtype)
            if problem:
                raise ExportError(f"parity check failed: {problem}; {out} was not written")
            (staging / "parity.json").write_text(json.dumps({"dtype": dtype, **asdict(report)}, indent=2))
    return ExportResult(out, dtype, merged, report, parity and not quantized)
