"""Fused LoRA linear layers: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ as one autograd node.

peft's LoRA forward is four modules and five autograd nodes (base linear, dropout, A, B, the
scaling multiply and the add), each writing a full (tokens, out) or (tokens, rank) tensor. With
dropout 0 the whole layer is two products: the low-rank term is added into the base product's
output in place (``addmm_``, the GEMM's own accumulate: no separate scale or add pass), and the
backward is written out by hand:

    g_B = s·gᵀ(x Aᵀ)      g_A = (s·g B)ᵀ x      g_x = g W + (s·g B) A

``g_x`` has the same shape of computation as the forward, so both run through ``matmul_lowrank``
(X Y + U V; kernels/lowrank.py, shared with the QLoRA layer). Its default is two BLAS calls (the second accumulating into the first's output). With
``training.fused_lora: triton`` it is one Triton kernel that accumulates both products in the same
tiles and writes the output once; the kernel is checked on CPU under ``TRITON_INTERPRET=1``.

Plain ``nn.Linear`` base layers and bitsandbytes' 4-bit ``Linear4bit`` ones (QLoRA: the weight is
dequantised in the forward and again in the backward, kernels/qlora.py) are fused where the weight is
frozen, one adapter is active, dropout is 0 and there is no DoRA; anything else (DoRA, a disabled or
merged adapter, mixed adapter batches) keeps peft's forward, decided at each call.
"""

from __future__ import annotations

from contextlib import nullcontext
import types

import torch
from torch import nn

# The products and the state check are shared with the QLoRA layer; callers import matmul_lowrank,
# triton and triton_usable from here, as before they moved to kernels/lowrank.py.
from tunesmith.kernels.lowrank import (fusable, lora_backward, lora_forward, matmul_lowrank,  # noqa: F401
                                       triton, triton_usable)
from tunesmith.kernels.qlora import fused_qlora_forward, is_qlora_layer


class LoRALinearFunction(torch.autograd.Function):
    """x (M, K), frozen weight (N, K) and bias, lora_A (R, K), lora_B (N, R), scale -> (M, N)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, use_triton: bool):
        out, xa = lora_forward(x, weight, bias, lora_a, lora_b, scale, use_triton)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
        ctx.scale, ctx.use_triton = scale, use_triton
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with torch.autocast(grad.device.type, enabled=False):  # the loop's backward runs under autocast
            grad_x, grad_bias, grad_a, grad_b = lora_backward(grad, x, weight, lora_a, lora_b, xa, ctx.scale,
                                                              ctx.use_triton, (needs[0], needs[2], needs[3], needs[4]))
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs or not fusable(self):
        return self._peft_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.base_layer
    flat = x.reshape(-1, x.shape[-1])
    use_triton = self._fused_lora_kernel == "triton" and triton_usable(flat)
    weight, bias, device = base.weight, base.bias, flat.device.type
    autocast = torch.is_autocast_enabled(device)
    if autocast:  # do as autocast does for nn.Linear, once, outside: inside, mixed dtypes would meet in addmm_
        dtype = torch.get_autocast_dtype(device)
        flat, weight = flat.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device, enabled=False) if autocast else nullcontext():
        out = LoRALinearFunction.apply(flat, weight, bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                       float(self.scaling[name]), use_triton)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def fuse_lora(model: nn.Module, kernel: str = "blas") -> int:
    """Route every eligible peft LoRA linear layer of ``model`` (over ``nn.Linear``, or over a 4-bit
    ``Linear4bit``: kernels/qlora.py) through the fused function; returns how many layers were routed.
    ``kernel``: "blas" (two GEMMs, the second accumulating in place) or "triton" (one kernel; on CUDA,
    or on CPU under TRITON_INTERPRET=1)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if kernel == "triton" and triton is None:
        raise RuntimeError("training.fused_lora: triton needs the triton package (pip install triton)")
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is nn.Linear:
            forward = _fused_forward
        elif is_qlora_layer(module):
            forward = fused_qlora_forward
        else:
            continue
        if not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(forward, module)
        module._fused_lora_kernel = kernel
        count += 1
    return count
