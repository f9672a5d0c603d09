"""Apply a training method to a loaded model: full, freeze, LoRA, DoRA, QLoRA."""

from __future__ import annotations

import logging
import re

from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import PreTrainedModel

from tunesmith.config.schema import FreezeConfig, MethodConfig
from tunesmith.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTER_METHODS = ("lora", "dora", "qlora")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (``model.model.layers`` for Llama-like models)."""
    for module in model.modules():
        for name in ("layers", "h", "blocks"):
            child = getattr(module, name, None)
            if isinstance(child, nn.ModuleList) and len(child) > 0:
                return child
    raise ConfigError(["method.freeze: cannot find the decoder layers of this model; use method.freeze.pattern"])


def apply_freeze(model: PreTrainedModel, freeze: FreezeConfig) -> None:
    """Train only the last N decoder layers, parameters matching a regex, and optionally embeddings/head."""
    model.requires_grad_(False)
    if freeze.last_n_layers:
        layers = decoder_layers(model)
        for layer in layers[max(0, len(layers) - freeze.last_n_layers):]:
            layer.requires_grad_(True)
    if freeze.pattern:
        pattern = re.compile(freeze.pattern)
        matched = [p for name, p in model.named_parameters() if pattern.search(name)]
        if not matched:
            raise ConfigError([f"method.freeze.pattern: {freeze.pattern!r} matches no parameter name"])
        for parameter in matched:
            parameter.requires_grad_(True)
    if freeze.train_embeddings:
        model.get_input_embeddings().requires_grad_(True)
    if freeze.train_lm_head:
        model.get_output_embeddings().requires_grad_(True)


def apply_method(model: PreTrainedModel, method: MethodConfig, gradient_checkpointing: bool = False) -> nn.Module:
    """Return the model to train, with exactly the parameters of the method requiring grad."""
    if method.type == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if method.type == "full":
        model.requires_grad_(True)
        return model
    if method.type == "freeze":
        apply_freeze(model, method.freeze)
        return model
    lora = method.lora
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.rslora,
        use_dora=method.type == "dora",
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def _numel(parameter: nn.Parameter) -> int:
    # bitsandbytes packs two 4-bit values per byte; its quant_state knows the real shape.
    state = getattr(parameter, "quant_state", None)
    return state.shape.numel() if state is not None else parameter.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, 4-bit weights counted by their real size."""
    trainable = total = 0
    for parameter in model.parameters():
        total += _numel(parameter)
        if parameter.requires_grad:
            trainable += _numel(parameter)
    return trainable, total

