"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for ``training.distributed: fsdp``: each decoder layer and
the whole model sharded over the processes, and the whole-state views a checkpoint and the final model need.

torch does the sharding, the gathering and the state-dict conversions (``torch.distributed.checkpoint.
state_dict``); what is ours is when to use it and how its states meet tunesmith's checkpoint files. A
sharded run's checkpoint holds each process's shards (``torch.distributed.checkpoint``), written by every
process into the staging folder the main process then commits; it resumes on any number of processes,
sharded or not (DCP reshards on load).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from peft import PeftModel

from tunesmith.adapters.apply import decoder_layers
from tunesmith.adapters.bottleneck import is_bottleneck
from tunesmith.config.schema import TrainingConfig

log = logging.getLogger(__name__)

# Bytes a parameter takes in full fine-tuning with AdamW: fp32 weight, gradient and two moments.
FULL_BYTES_PER_PARAMETER = 16


def strategy(training: TrainingConfig, model: nn.Module, accelerator: Accelerator) -> str | None:
    """ddp or fsdp under several processes (None for one): ``training.distributed``, or for auto, fsdp when a
    full or freeze fine-tune's weights, gradients and AdamW state would not fit 80% of one GPU."""
    if accelerator.num_processes == 1:
        return None
    chosen = training.distributed
    if chosen == "auto":
        chosen = "ddp"
        adapter = isinstance(model, PeftModel) or is_bottleneck(model)
        if not adapter and accelerator.device.type == "cuda":
            need = sum(p.numel() for p in model.parameters()) * FULL_BYTES_PER_PARAMETER
            if need > 0.8 * torch.cuda.get_device_properties(accelerator.device).total_memory:
                chosen = "fsdp"
    return chosen


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: nn.Module, training: TrainingConfig) -> nn.Module:
    """Shard each decoder layer, then the rest of the model (embeddings, final norm, head), over all processes."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options: dict[str, Any] = {"reshard_after_forward": training.fsdp.reshard_after_forward}
    if training.fsdp.cpu_offload:  # pinned host memory where there is a GPU to copy to
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    if training.mixed_precision in ("bf16", "fp16") or (
            training.mixed_precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        dtype = torch.float16 if training.mixed_precision == "fp16" else torch.bfloat16
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **options)
    # The root's weights (embeddings, final norm, head) stay gathered from its forward to the end of backward:
    # the chunked loss uses the head outside the model's forward.
    fully_shard(model, **{**options, "reshard_after_forward": False})
    log.info("fsdp: %d decoder layers and the model sharded over the processes (reshard after forward: %s, "
             "CPU offload: %s)", len(layers), training.fsdp.reshard_after_forward, training.fsdp.cpu_offload)
    return model


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def trainable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters, whole, on the CPU of process 0 (the others get an empty dict). Every process
    must call it: each parameter is gathered in turn, so no process holds more than one whole at a time."""
    import torch.distributed as dist

    model.reshard()  # a forward without backward (eval) leaves the root's weights gathered
    keep = dist.get_rank() == 0
    weights = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            whole = _full(parameter.detach())
            if keep:
                weights[name] = whole.contiguous().cpu()
    return weights


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Whole trainable weights into a sharded model (each process keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.reshard()
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False,
                                                                  broadcast_from_rank0=True))


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight, whole, on the CPU (process 0 has them; the others an empty dict). Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model.reshard()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # A tied weight (the head sharing the embeddings) is named once, as the model itself saves it.
    named = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: tensor for name, tensor in state.items() if name in named}


SHARDS = "shards"  # a sharded checkpoint's torch.distributed.checkpoint folder


def _states(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The trainable weights and the optimizer state as torch.distributed.checkpoint saves and loads them
    (sharded where the model is; plain tensors where it is not)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    if is_sharded(model):
        model.reshard()  # a forward without backward (eval) leaves the root's weights gathered
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    weights = {name: value for name, value in get_model_state_dict(model).items() if name in trainable}
    return {"model": weights, "optim": get_optimizer_state_dict(model, optimizer)}


def save_shards(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every process writes its own shards of the trainable weights and optimizer state into ``folder`` (a
    checkpoint's staging folder; the main process commits it). Every process must call it."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_states(model, optimizer), checkpoint_id=str(folder))


def load_shards(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Read a sharded checkpoint into ``model`` and ``optimizer``, whatever the number of processes that wrote
    it and whether this model is sharded (one process without a process group reads it whole)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
        set_optimizer_state_dict

    states = _states(model, optimizer)
    dcp.load(states, checkpoint_id=str(folder))
    set_model_state_dict(model, states["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, optim_state_dict=states["optim"])
