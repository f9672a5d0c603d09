"""Fused QLoRA linear layers: dequantise + matmul + LoRA, y = x Wᵀ + b + s·(x Aᵀ) Bᵀ, as one autograd node.

peft's LoRA layer over a bitsandbytes 4-bit base (``peft.tuners.lora.bnb.Linear4bit``, what
``method.type: qlora`` creates) runs the base layer (bitsandbytes' ``MatMul4Bit``: dequantise, matmul),
a defensive clone of its output, then dropout, A, B, the scaling multiply and the add, each its own
autograd node writing a full (tokens, out) or (tokens, rank) tensor. bitsandbytes has no LoRA path and
peft only composes the two, so the fusion is ours: with dropout 0 the layer is the plain fused layer's
two products (``lora_forward`` and ``lora_backward`` in kernels/lowrank.py, through ``matmul_lowrank``:
BLAS, or one Triton kernel under ``training.fused_lora: triton``) over a weight that bitsandbytes'
``dequantize_4bit`` unpacks from the layer's packed weight and ``quant_state``:

    y = x Wᵀ + b + s·(x Aᵀ) Bᵀ      g_x = g W + (s·g B) A      g_A = (s·g B)ᵀ x      g_B = s·gᵀ(x Aᵀ)

The dequantised W is dropped at the end of the forward and unpacked again in the backward (only where
g_x is needed): between the two only x, x Aᵀ and the packed 4-bit weight, which the layer holds anyway,
are kept. That is QLoRA's memory point; a (out, in) weight per layer alive until its backward would
undo it. A and B get gradients, and the base bias where peft trains it (``bias: all``); the weight never.

Dtypes follow bitsandbytes' ``Linear4bit``: the products run in the layer's ``compute_dtype`` and the
output comes back in the input's dtype. Under autocast they run in autocast's dtype, cast once outside
the node, as the plain fused layer does. Whether a call is fused is decided at each call as for plain
layers (``fusable``); a call without gradients (evaluation, sampling) and a weight that bitsandbytes has
repacked for its CPU inference kernel (``packing_format_for_cpu``, which ``dequantize_4bit`` does not read)
keep peft's forward, so that a trained model computes what the same model reloaded from its adapter does.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from bitsandbytes.functional import QuantState, dequantize_4bit
from bitsandbytes.nn import Linear4bit
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
from torch import nn

from tunesmith.kernels.lowrank import fusable, lora_backward, lora_forward, triton_usable


def dequantize(packed: torch.Tensor, quant_state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight that ``packed`` (bitsandbytes' 4-bit storage) and ``quant_state`` encode, in ``dtype``."""
    return dequantize_4bit(packed, quant_state).to(dtype)


class QLoRALinearFunction(torch.autograd.Function):
    """x (M, K), packed 4-bit weight of (N, K) with its quant_state, bias, lora_A (R, K), lora_B (N, R),
    scale -> (M, N)."""

    @staticmethod
    def forward(ctx, x, packed, quant_state, bias, lora_a, lora_b, scale: float, use_triton: bool):
        weight = dequantize(packed, quant_state, x.dtype)  # (N, K): lives until this function returns
        out, xa = lora_forward(x, weight, bias, lora_a, lora_b, scale, use_triton)
        ctx.save_for_backward(x, lora_a, lora_b, xa)
        # The packed weight is frozen and held by the layer: kept on ctx, as bitsandbytes' MatMul4Bit keeps
        # it, so that saved-tensor hooks (training.offload_activations) do not copy it to the host per call.
        ctx.packed, ctx.quant_state = packed, quant_state
        ctx.scale, ctx.use_triton = scale, use_triton
        return out

    @staticmethod
    def backward(ctx, grad):
        x, lora_a, lora_b, xa = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with torch.autocast(grad.device.type, enabled=False):  # the loop's backward runs under autocast
            weight = dequantize(ctx.packed, ctx.quant_state, x.dtype) if needs[0] else None  # (N, K), again
            grad_x, grad_bias, grad_a, grad_b = lora_backward(grad, x, weight, lora_a, lora_b, xa, ctx.scale,
                                                              ctx.use_triton, (needs[0], needs[3], needs[4], needs[5]))
        return grad_x, None, None, grad_bias, grad_a, grad_b, None, None


def is_qlora_layer(module: nn.Module) -> bool:
    """A peft LoRA layer over a bitsandbytes 4-bit linear layer (NF4 or FP4): what ``fused_qlora_forward`` serves."""
    return type(module) is LoraLinear4bit and isinstance(module.base_layer, Linear4bit)


def _compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype bitsandbytes' Linear4bit computes ``x`` in, fixed at its first call as its forward fixes it."""
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    return base.compute_dtype or x.dtype


def fused_qlora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The forward of a peft LoRA layer over a bitsandbytes Linear4bit, installed by ``fuse_lora``."""
    base = self.base_layer
    fix_4bit_weight_quant_state_from_module(base)  # as Linear4bit's forward: FSDP may have dropped it
    quant_state = base.weight.quant_state
    # Without gradients (evaluation, sampling, serving) bitsandbytes' own inference kernels run, as in a model
    # loaded from the saved adapter: the fusion is for training, and a reloaded run computes what it computed.
    if args or kwargs or not torch.is_grad_enabled() or not fusable(self) \
            or getattr(quant_state, "packing_format_for_cpu", False):
        return self._peft_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    flat = x.reshape(-1, x.shape[-1])  # (M, K)
    device = flat.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else _compute_dtype(base, flat)
    bias = base.bias.to(dtype) if base.bias is not None else None
    use_triton = self._fused_lora_kernel == "triton" and triton_usable(flat)
    with torch.autocast(device, enabled=False) if autocast else nullcontext():
        out = QLoRALinearFunction.apply(flat.to(dtype), base.weight, quant_state, bias, self.lora_A[name].weight,
                                        self.lora_B[name].weight, float(self.scaling[name]), use_triton)
    if not autocast:
        out = out.to(x.dtype)  # as Linear4bit returns its input's dtype; under autocast, autocast's (as nn.Linear)
    return out.reshape(*x.shape[:-1], out.shape[-1])  # (..., N)
