"""The training fast path's set-up: which models take it, and the kernels it switches on.

Shared by every recipe (and by the log-prob helpers beside the losses), so it lives beside the
models rather than in one recipe.
"""

from __future__ import annotations

import functools
import logging
import os
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.distributed.fsdp import FSDPModule

from tunesmith.config.schema import Config, TrainingConfig
from tunesmith.kernels.lora import fuse_lora, triton_usable
from tunesmith.models import varlen

log = logging.getLogger(__name__)


# Model families whose causal-LM forward is exactly lm_head(decoder(x)) (no logit scaling or capping)
# and whose attention masks come from transformers' masking utilities, which read restarting position
# ids as row boundaries. The fast path is used for these only; other models take the plain path.
FAST_PATH_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def fast_path_model(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return (config is not None and config.model_type in FAST_PATH_MODELS
            and not getattr(config, "auto_map", None))  # remote code may build its own masks


HIDDEN_ONLY = "tunesmith_hidden_only"  # the forward keyword that asks a wrapped model for its final hidden states


def decoder_and_head(model: nn.Module) -> tuple[Callable[..., Any], nn.Module] | None:
    """(a function from the model's inputs to the decoder stack's output, the LM head) of a causal LM, for
    the chunked loss; None where it does not apply: virtual-token methods, model families outside
    ``FAST_PATH_MODELS``.

    Under DDP the wrapper's own forward must run (it prepares the gradient all-reduce), and under FSDP2 the
    model's (it gathers the weights outside the decoder layers), so the decoder is reached through it: the wrapped model's forward learns the keyword ``tunesmith_hidden_only``, which
    returns the decoder's output and leaves the head (and the full logits) to the chunked loss."""
    wrapper, model = unwrapped_parts(model)  # an FSDP2 root's forward gathers the weights outside its layers
    inner = model
    if isinstance(model, PeftModel):
        if model.peft_config[model.active_adapter].is_prompt_learning:
            return None
        inner = model.get_base_model()
    if not fast_path_model(inner) or zero3_partitioned(model):  # ZeRO-3: the head is gathered only in its forward
        return None
    decoder, head = getattr(inner, "model", None), inner.get_output_embeddings()
    if not isinstance(decoder, nn.Module) or head is None:
        return None
    return through_wrapper(wrapper, model, decoder), head


def through_wrapper(wrapper: nn.Module | None, model: nn.Module, decoder: nn.Module) -> Callable[..., Any]:
    """A call of ``decoder`` (a part of ``model``) that runs the wrapper's forward first where there is one
    (DDP's, or an FSDP2 root's): ``wrapper(..., tunesmith_hidden_only=True)``."""
    if wrapper is None:
        return decoder
    _answer_hidden_only(model, decoder)
    return functools.partial(wrapper, **{HIDDEN_ONLY: True})


def is_deepspeed_engine(model: nn.Module) -> bool:
    """A DeepSpeed engine (accelerate's prepare under DeepSpeed), told by its class: deepspeed is optional."""
    return type(model).__name__ == "DeepSpeedEngine" and type(model).__module__.startswith("deepspeed")


def zero3_partitioned(model: nn.Module) -> bool:
    """Whether ``model``'s weights are partitioned by DeepSpeed ZeRO stage 3 (each holds only its shard outside
    the forward of the module that owns it)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def unwrapped_parts(model: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """(the wrapper whose forward must run: DDP, a DeepSpeed engine or an FSDP2 root, or None; the model
    inside it)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) or is_deepspeed_engine(model):
        return model, model.module
    return (model if isinstance(model, FSDPModule) else None), model


def _answer_hidden_only(model: nn.Module, decoder: nn.Module) -> None:
    """Give ``model`` (the module a DDP wrapper holds) a forward that, asked with ``tunesmith_hidden_only``,
    runs ``decoder`` alone. An instance attribute: the class and other instances are untouched."""
    if getattr(model, "_tunesmith_hidden_only", False):
        return
    plain = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if kwargs.pop(HIDDEN_ONLY, False):
            return decoder(*args, **kwargs)
        return plain(*args, **kwargs)

    model.forward = forward
    model._tunesmith_hidden_only = True


def chunk_mlp(mlp: nn.Module, tokens: int) -> None:
    """Run ``mlp`` over at most ``tokens`` positions at a time, each chunk under activation checkpointing:
    backward recomputes one chunk at a time, so the MLP's intermediates (gate, up, their product: tokens x
    intermediate size each, 3.5x the hidden size in Llama) exist for one chunk only. The MLP is
    position-wise, so the chunks' outputs are exactly the whole sequence's. An instance attribute: the class
    and other instances are untouched."""
    if getattr(mlp, "_tunesmith_chunked", None) is None:
        # Bound to the module (not a closure over it): a deep copy (a DPO reference model) runs its own weights.
        mlp.forward = types.MethodType(_chunked_mlp_forward, mlp)
    mlp._tunesmith_chunked = tokens


def _chunked_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    plain = functools.partial(type(self).forward, self)
    size = self._tunesmith_chunked
    if x.shape[-2] <= size:
        return plain(x)
    if not torch.is_grad_enabled():  # nothing is kept for backward: one chunk's intermediates at a time
        return torch.cat([plain(piece) for piece in x.split(size, dim=-2)], dim=-2)
    return torch.cat([checkpoint(plain, piece, use_reentrant=False) for piece in x.split(size, dim=-2)], dim=-2)


@contextmanager
def plain_forward(model: nn.Module) -> Iterator[None]:
    """The fast path's training kernels off inside (rollout generation): fused LoRA layers run peft's own
    forward and per-row attention goes back to transformers' ``sdpa``, so ``generate`` runs exactly what plain
    transformers + peft run. Those kernels pay off on long packed rows with a backward; a decoding step is a
    few rows of one token, where they only add calls. Both are restored on every exit path (STYLE 8)."""
    model = unwrapped_parts(model)[1]
    fused = [m for m in model.modules() if hasattr(m, "_peft_forward") and "forward" in vars(m)]
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    config = getattr(inner, "config", None)
    varlen_on = config is not None and getattr(config, "_attn_implementation", None) == varlen.NAME
    swapped = [(m, m.forward) for m in fused]
    try:
        for module in fused:
            module.forward = module._peft_forward
        if varlen_on:
            inner.set_attn_implementation("sdpa")
        yield
    finally:
        for module, forward in swapped:
            module.forward = forward
        if varlen_on:
            inner.set_attn_implementation(varlen.NAME)


def packs_padding_free(config: Config, model: nn.Module) -> bool:
    """Whether micro-batches are packed padding-free: asked for, and exact for this model and method
    (where not, the log says why)."""
    if not config.training.padding_free:
        return False
    why = ("virtual tokens are prepended to every row" if config.method.type in ("prefix", "prompt")
           else None if fast_path_model(model) else f"{model.config.model_type} is not in the fast-path families")
    if why is not None:
        log.info("training.padding_free: padded micro-batches instead (%s)", why)
    return why is None


def apply_speedups(model: nn.Module, training: TrainingConfig, padding_free: bool) -> list[str]:
    """Switch on the fast path's kernels that apply to this model, method and device (each has its
    switch in ``training``); logs and returns what was switched on."""
    applied = []
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    # DeepSpeed ZeRO-3 (partitioning comes later, in accelerate's prepare) gathers a module's weights only for
    # its own forward: fused LoRA and the chunked loss read weights outside it.
    zero3 = training.distributed == "deepspeed" and training.deepspeed.stage == 3 and \
        int(os.environ.get("WORLD_SIZE", "1")) > 1
    if padding_free and training.varlen_attention and inner.config._attn_implementation == "sdpa":
        inner.set_attn_implementation(varlen.NAME)
        applied.append("per-row attention (sdpa_varlen)")
    if training.fused_lora != "off" and not zero3:
        kernel = training.fused_lora
        if kernel == "triton" and not triton_usable(next(model.parameters())):
            log.info("training.fused_lora: triton runs on CUDA only here; the blas kernel instead")
            kernel = "blas"
        layers = fuse_lora(model, kernel)
        if layers:
            applied.append(f"fused LoRA ({kernel}) in {layers} layers")
    if training.liger and next(model.parameters()).is_cuda and fast_path_model(inner):
        try:
            from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
        except ImportError:
            log.info("training.liger: liger-kernel is not installed (pip install liger-kernel); plain kernels")
        else:  # the loss is ours (chunked_loss_sum uses Liger's fused linear cross-entropy on GPU)
            _apply_liger_kernel_to_instance(model=inner, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                            fused_linear_cross_entropy=False)
            applied.append("Liger RMSNorm, RoPE and SwiGLU")
    if training.chunked_mlp:
        layers = getattr(getattr(inner, "model", None), "layers", None) or []
        chunked = [layer.mlp for layer in layers if isinstance(getattr(layer, "mlp", None), nn.Module)]
        for mlp in chunked:
            chunk_mlp(mlp, training.chunked_mlp)
        if chunked:
            applied.append(f"chunked MLP ({training.chunked_mlp} tokens) in {len(chunked)} layers")
        else:
            log.info("training.chunked_mlp: no decoder layers with an mlp on %s; not chunked", type(inner).__name__)
    if training.compile:
        layers = getattr(getattr(inner, "model", None), "layers", None)
        if layers is None:
            log.info("training.compile: no decoder layer list on %s; not compiled", type(inner).__name__)
        else:
            for layer in layers:
                layer.compile()
            applied.append(f"torch.compile on {len(layers)} decoder layers")
    if training.chunked_loss and decoder_and_head(model) is not None and not zero3:
        applied.append("chunked loss (no full logits)")
    if applied:
        log.info("fast path: %s", ", ".join(applied))
    return applied
