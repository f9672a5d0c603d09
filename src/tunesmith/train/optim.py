"""Optimizer and learning-rate schedule from the training config."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
from torch import nn

from tunesmith.config.schema import Config, TrainingConfig

# Parameters layer decay leaves at the base rate: virtual tokens (prompt/prefix) and the rows of added
# tokens are new, not pre-trained, and must learn in full.
_OWN_RATE = ("prompt_encoder", "trainable_tokens", "token_adapter")
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def layer_scale(name: str, layers: int, decay: float) -> float:
    """Discriminative fine-tuning: the learning-rate multiplier of parameter ``name`` in a model of
    ``layers`` blocks. The top block learns at ``decay``, each block below at one more factor of it,
    the embeddings below them all, and what sits above the blocks (final norm, head) at 1.

    >>> [layer_scale(n, 2, 0.5) for n in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
    ...                                   "model.layers.1.mlp.up_proj.weight", "lm_head.weight",
    ...                                   "prompt_encoder.default.embedding.weight")]
    [0.125, 0.25, 0.5, 1.0, 1.0]
    """
    if any(own in name for own in _OWN_RATE):
        return 1.0
    found = _LAYER.search(name)
    if found:
        return decay ** (layers - int(found.group(1)))
    if name.endswith(("embed_tokens.weight", "wte.weight", "wpe.weight")):
        return decay ** (layers + 1)
    return 1.0


def lr_scale_for(config: Config, layers: int) -> Callable[[str], float] | None:
    """The per-parameter learning-rate multiplier the config asks for (layer decay, LoRA+), or None."""
    decay, ratio = config.training.layer_decay, config.method.lora.lr_ratio
    if ratio is not None and config.method.type not in ("lora", "dora", "qlora"):
        ratio = None
    if decay is None and ratio is None:
        return None

    def scale(name: str) -> float:
        value = layer_scale(name, layers, decay) if decay is not None else 1.0
        return value * (ratio if ratio is not None and "lora_B" in name else 1.0)

    return scale


def parameter_groups(model: nn.Module, weight_decay: float,
                     lr_scale: Callable[[str], float] | None = None, lr: float = 1.0) -> list[dict]:
    """Trainable parameters grouped by (decayed?, learning rate). Weight decay goes on matrices only:
    biases and norm weights (1-D) are not decayed."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            key = (parameter.ndim >= 2, lr * (lr_scale(name) if lr_scale else 1.0))
            groups.setdefault(key, []).append(parameter)
    return [{"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr": group_lr}
            for (decayed, group_lr), params in sorted(groups.items(), key=lambda item: (not item[0][0], -item[0][1]))]


def build_optimizer(model: nn.Module, config: TrainingConfig,
                    lr_scale: Callable[[str], float] | None = None) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay, lr_scale, config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr)
    if config.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps,
                             fused=fused_adamw(model, config) or None)


def fused_adamw(model: nn.Module, config: TrainingConfig) -> bool:
    """torch's single-kernel AdamW: asked for (adamw_fused), or plain adamw with every trainable parameter on
    a GPU, where it is one kernel a step instead of a dozen per group (and no foreach scratch copy). Not where
    an offload steps the optimizer on CPU copies (FSDP's cpu_offload, DeepSpeed's offload_optimizer)."""
    if config.optimizer == "adamw_fused":
        return True
    offloaded = config.fsdp.cpu_offload or config.deepspeed.offload_optimizer
    trainable = [p for p in model.parameters() if p.requires_grad]
    return config.optimizer == "adamw" and not offloaded and bool(trainable) and all(p.is_cuda for p in trainable)


def warmup_steps(config: TrainingConfig, total_steps: int) -> int:
    if config.warmup_steps is not None:
        return config.warmup_steps
    return round((config.warmup_ratio or 0.0) * total_steps)


def lr_factor(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warmup, then decay.

    >>> [round(lr_factor(s, 10, 2, "linear"), 3) for s in (0, 1, 2, 6, 10)]
    [0.333, 0.667, 1.0, 0.5, 0.0]
    >>> round(lr_factor(6, 10, 2, "cosine"), 3)
    0.5
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps(config, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, config.scheduler))
