"""A model name as a user writes it, resolved once per command: a run folder, a model or adapter
folder, a .gguf file, 'embedded', a hub id, or ``registry:NAME@ALIAS`` / ``registry:NAME/VERSION``
(a registered version's local copy, laid out as a run folder).

This sits above the registry and the models, so that loading code never imports the registry.
"""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunesmith.models.inference import Head, Target, inspect_target, load_for_inference

REGISTRY_PREFIX = "registry:"


def resolve_target(spec: str | Target) -> Target:
    """``spec`` looked at once; a registry name becomes its version's local folder (named after the model)."""
    if isinstance(spec, Target):
        return spec
    if spec.startswith(REGISTRY_PREFIX):
        from tunesmith.registry import resolve

        return inspect_target(str(resolve(spec)), spec=spec, registered=spec[len(REGISTRY_PREFIX):])
    return inspect_target(spec)


def load_target(spec: str | Target, device: str = "auto", dequantize: bool = False, head: Head = "lm"
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``resolve_target`` then ``models.inference.load_for_inference``."""
    return load_for_inference(resolve_target(spec), device, dequantize, head)
