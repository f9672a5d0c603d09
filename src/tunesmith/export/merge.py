"""The step every export starts with: load the trained thing, remember how it behaves, merge.

The reference behaviour is recorded from the training-time model (adapter attached, 4-bit base for
QLoRA) before anything is merged, so each writer can prove its output still behaves the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunesmith.errors import TunesmithError
from tunesmith.export.parity import Reference, record_reference
from tunesmith.generate.sample import stop_token_ids
from tunesmith.models.inference import Target, load_for_inference
from tunesmith.targets import resolve_target

log = logging.getLogger(__name__)


class ExportError(TunesmithError):
    """An export that cannot be written or failed its parity check; nothing was written."""


@dataclass
class Merged:
    model: PreTrainedModel  # plain transformers model, float32, on CPU
    tokenizer: PreTrainedTokenizerBase
    reference: Reference | None
    merged: bool  # an adapter was merged into the base
    from_qlora: bool  # the adapter was trained on a 4-bit base: parity is reported, not enforced


def _why_unmergeable(model: object) -> str | None:
    """Why ``model``'s adapter cannot be folded into plain weights, or None if it can (or there is none)."""
    from tunesmith.adapters.bottleneck import is_bottleneck

    if is_bottleneck(model):
        return "bottleneck adapters are extra non-linear layers"
    if isinstance(model, PeftModel) and model.peft_config[model.active_adapter].is_prompt_learning:
        return "its prefix/prompt virtual tokens are inputs, not weights"
    return None


def merge_for_export(target: str | Target, parity: bool = True) -> Merged:
    """``target`` (run, adapter or model folder, GGUF, 'embedded', registry name) as one float32 model on CPU."""
    target = resolve_target(target)
    config = target.config
    from_qlora = config is not None and config.method.type == "qlora"
    model, tokenizer = load_for_inference(target, "cpu")
    why = _why_unmergeable(model)  # decided from what loaded: a run folder or an adapter folder alike
    if why:
        raise ExportError(f"{target.spec} cannot be merged into plain weights ({why}); use it as it is with "
                          "`tunesmith chat` or `tunesmith serve`")
    reference = record_reference(model, tokenizer) if parity else None
    merged = isinstance(model, PeftModel)
    if merged and from_qlora:
        log.info("QLoRA run: merging into the de-quantized base (never into the 4-bit weights); parity against "
                 "the 4-bit training model is reported, not enforced")
        del model
        model, _ = load_for_inference(target, "cpu", dequantize=True)
    if merged:
        model = model.merge_and_unload()
    model = model.to(torch.float32)
    stops = stop_token_ids(model, tokenizer)  # EOS and the template's turn-end token: no run-on in plain HF
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return Merged(model, tokenizer, reference, merged, from_qlora)
