"""Apply a training method to a loaded model: full, freeze (with gradual unfreezing), LoRA, DoRA,
QLoRA, prefix tuning, prompt tuning, IA3 (peft) and bottleneck adapters (ours)."""

from __future__ import annotations

import logging
import re

from collections.abc import Callable

import torch
from peft import IA3Config, PeftConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model, \
    prepare_model_for_kbit_training
from peft import LoraConfig as PeftLoraConfig
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunesmith.config.schema import FreezeConfig, MethodConfig
from tunesmith.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTER_METHODS = ("lora", "dora", "qlora", "prefix", "prompt", "ia3", "adapter")
PROMPT_LEARNING = ("prefix", "prompt")  # virtual tokens: nothing to merge into the weights


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
    if freeze.unfreeze_every:  # gradual unfreezing ends with every block training
        decoder_layers(model).requires_grad_(True)


def gradual_unfreeze(model: nn.Module, freeze: FreezeConfig) -> Callable[[int], list[nn.Parameter]] | None:
    """For ``freeze.unfreeze_every``: a function giving, for an optimizer step, the parameters still held
    frozen (the blocks below the top ``last_n_layers + step // unfreeze_every``).

    Every block requires grad from the start, so the optimizer, checkpoints and DDP see one fixed set of
    parameters; the loop drops the held parameters' gradients before clipping and stepping, which leaves
    them exactly unchanged (AdamW skips a parameter without a gradient, weight decay included).
    """
    if not freeze.unfreeze_every:
        return None
    layers = list(decoder_layers(model))
    start, every = freeze.last_n_layers or 0, freeze.unfreeze_every

    def held(step: int) -> list[nn.Parameter]:
        training = min(len(layers), start + step // every)
        return [p for layer in layers[:len(layers) - training] for p in layer.parameters()]

    return held


def _initialise_prompt(model: nn.Module, tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    """Set the virtual tokens to the embeddings of ``text``'s tokens, repeated to fill them (peft would
    load the tokenizer again by name, which fails for the embedded model and local templates)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError([f"method.prompt.init_text: {text!r} has no tokens"])
    embedding = model.prompt_encoder["default"].embedding
    count = embedding.weight.shape[0]
    ids = (ids * (count // len(ids) + 1))[:count]
    with torch.no_grad():
        source = model.get_input_embeddings().weight[torch.tensor(ids, device=embedding.weight.device)]
        embedding.weight.copy_(source.to(embedding.weight.dtype))


def peft_config(method: MethodConfig, model: PreTrainedModel, new_token_ids: list[int] = (),
                task_type: str = "CAUSAL_LM") -> PeftConfig:
    """The peft config of an adapter method (all but ``adapter``, which is ours). With LoRA, the rows of
    ``new_token_ids`` (added tokens) train too, through peft's trainable tokens: only those rows."""
    if method.type == "prefix":
        prefix = method.prefix
        return PrefixTuningConfig(num_virtual_tokens=prefix.num_virtual_tokens, prefix_projection=prefix.projection,
                                  encoder_hidden_size=prefix.projection_hidden_size or model.config.hidden_size,
                                  task_type="CAUSAL_LM")
    if method.type == "prompt":
        return PromptTuningConfig(num_virtual_tokens=method.prompt.num_virtual_tokens, task_type="CAUSAL_LM")
    if method.type == "ia3":
        return IA3Config(target_modules=method.ia3.target_modules, feedforward_modules=method.ia3.feedforward_modules,
                         task_type="CAUSAL_LM")
    lora = method.lora
    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, use_rslora=lora.rslora,
                          use_dora=method.type == "dora", bias=lora.bias, task_type=task_type,
                          trainable_token_indices=list(new_token_ids) or None)


def apply_method(model: PreTrainedModel, method: MethodConfig, gradient_checkpointing: bool = False,
                 tokenizer: PreTrainedTokenizerBase | None = None, new_token_ids: list[int] = (),
                 task_type: str = "CAUSAL_LM") -> nn.Module:
    """Return the model to train, with exactly the parameters of the method requiring grad.
    ``new_token_ids``: added tokens, whose embedding rows must train (the config validator has checked
    that the method trains them). ``task_type="SEQ_CLS"`` (a reward model): peft trains the scoring
    head in full beside the adapter and saves it with it."""
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
    if method.type == "adapter":
        from tunesmith.adapters.bottleneck import add_bottleneck_adapters

        return add_bottleneck_adapters(model, method.adapter)
    if method.type == "prefix" and gradient_checkpointing:
        raise ConfigError(["training.gradient_checkpointing: not supported with method prefix (its virtual "
                           "tokens enter through the attention cache); set it to false"])
    peft_model = get_peft_model(model, peft_config(method, model, new_token_ids, task_type))
    if method.type == "prompt" and method.prompt.init_text:
        if tokenizer is None:
            raise ValueError("prompt tuning with init_text needs the tokenizer")
        _initialise_prompt(peft_model, tokenizer, method.prompt.init_text)
    return peft_model


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

