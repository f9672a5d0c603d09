"""`tunesmith export RUN --to hf`: merge the adapter into the base and write a plain transformers folder.

The folder is written into a staging folder, loaded back and compared with the training-time
model (adapter attached); only if parity holds is it moved to its place. A QLoRA adapter is merged
into the de-quantized base (never into 4-bit weights), so its parity against the 4-bit training
model is reported, not enforced.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tunesmith.export.merge import ExportError, Merged, merge_for_export
from tunesmith.export.parity import ParityReport, check, compare
from tunesmith.io import atomic_directory
from tunesmith.models.inference import Target
from tunesmith.models.device import select_dtype

__all__ = ["ExportError", "ExportResult", "export_hf", "verify"]


@dataclass
class ExportResult:
    out: Path
    dtype: str
    merged: bool
    parity: ParityReport | None
    parity_enforced: bool


def verify(exported: torch.nn.Module, prepared: Merged, kind: str, out: Path, record: Path,
           extra: dict | None = None) -> ParityReport | None:
    """Compare ``exported`` with the training-time model; raise if ``kind``'s thresholds fail
    (not for a QLoRA run, whose reference is the 4-bit model); write the report to ``record``."""
    if prepared.reference is None:
        return None
    report = compare(exported, prepared.reference)
    problem = None if prepared.from_qlora else check(report, kind)
    if problem:
        raise ExportError(f"parity check failed: {problem}; {out} was not written")
    fields = {"format": kind, "enforced": not prepared.from_qlora, **asdict(report), **(extra or {})}
    record.write_text(json.dumps(fields, indent=2))
    return report


def export_hf(target: str | Target, out: Path, dtype: str = "float32", parity: bool = True) -> ExportResult:
    """Merge (if an adapter) and save ``target`` as a transformers folder at ``out``."""
    prepared = merge_for_export(target, parity)
    torch_dtype = select_dtype(dtype, torch.device("cpu"))
    model = prepared.model.to(torch_dtype)
    with atomic_directory(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        prepared.tokenizer.save_pretrained(staging)
        report = None
        if prepared.reference is not None:
            exported = AutoModelForCausalLM.from_pretrained(staging, dtype=torch_dtype)
            report = verify(exported, prepared, dtype, out, staging / "parity.json")
    return ExportResult(out, dtype, prepared.merged, report, parity and not prepared.from_qlora)
