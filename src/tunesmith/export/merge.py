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
from tunesmith.models.inference import load_for_inference, run_config_of

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


def _unmergeable_kind(model: object) -> str | None:
    from tunesmith.adapters.bottleneck import is_bottleneck

    if is_bottleneck(model):
        return "adapter"
    if isinstance(model, PeftModel) and model.peft_config[model.active_adapter].is_prompt_learning:
        return "prompt"
    return None


def merge_for_export(target: str, parity: bool = True) -> Merged:
    """``target`` (run, adapter or model folder, GGUF, 'embedded') as one float32 model on CPU."""
    config = run_config_of(target)
    from_qlora = config is not None and config.method.type == "qlora"
    unmergeable = {"prefix": "its virtual tokens are inputs, not weights",
                   "prompt": "its virtual tokens are inputs, not weights",
                   "adapter": "bottleneck adapters are extra non-linear layers"}
    if config is not None and config.method.type in unmergeable:
        raise ExportError(f"a {config.method.type} run cannot be merged into plain weights "
                          f"({unmergeable[config.method.type]}); use the run as it is with `tunesmith chat` or "
                          f"`tunesmith serve`")
    model, tokenizer = load_for_inference(target, "cpu")
    kind = _unmergeable_kind(model)
    if kind:  # an adapter folder given directly, not through its run
        raise ExportError(f"{target} holds a {kind} adapter, which cannot be merged into plain weights "
                          f"({unmergeable[kind]}); use it with `tunesmith chat` or `tunesmith serve`")
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
