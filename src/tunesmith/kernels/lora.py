"""Fused LoRA linear layers: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ as one autograd node.

peft's LoRA forward is four modules and five autograd nodes (base linear, dropout, A, B, the
scaling multiply and the add), each writing a full (tokens, out) or (tokens, rank) tensor. With
dropout 0 the whole layer is two products: the low-rank term is added into the base product's
output in place (``addmm_``, the GEMM's own accumulate: no separate scale or add pass), and the
backward is written out by hand:

    g_B = s·gᵀ(x Aᵀ)      g_A = (s·g B)ᵀ x      g_x = g W + (s·g B) A

``g_x`` has the same shape of computation as the forward, so both run through ``matmul_lowrank``
(X Y + U V). Its default is two BLAS calls (the second accumulating into the first's output). With
``training.fused_lora: triton`` it is one Triton kernel that accumulates both products in the same
tiles and writes the output once; the kernel is checked on CPU under ``TRITON_INTERPRET=1``.

Only plain ``nn.Linear`` base layers with a frozen weight, one active adapter, dropout 0 and no
DoRA are fused; anything else (QLoRA's 4-bit layers, DoRA, a disabled or merged adapter, mixed
adapter batches) keeps peft's forward, decided at each call.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
import types

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the BLAS path needs nothing
    triton = None


def triton_usable(tensor: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or on CPU ones under its interpreter (TRITON_INTERPRET=1)."""
    return triton is not None and (tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:
    @triton.jit
    def _matmul_lowrank_kernel(x_ptr, y_ptr, u_ptr, v_ptr, out_ptr, M, N, K, R,
                               sxm, sxk, syk, syn, sum_, sur, svr, svn, som, son,
                               IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """out[M, N] = x[M, K] @ y[K, N] + u[M, R] @ v[R, N], one (BLOCK_M, BLOCK_N) tile per program."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + rows[:, None] * sxm + ks[None, :] * sxk,
                        mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
            b = tl.load(y_ptr + ks[:, None] * syk + cols[None, :] * syn,
                        mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
            acc += tl.dot(a, b, input_precision="ieee" if IEEE else "tf32")
        rs = tl.arange(0, BLOCK_R)  # the rank fits one block: the low-rank term is one more dot
        a = tl.load(u_ptr + rows[:, None] * sum_ + rs[None, :] * sur,
                    mask=(rows[:, None] < M) & (rs[None, :] < R), other=0.0)
        b = tl.load(v_ptr + rs[:, None] * svr + cols[None, :] * svn,
                    mask=(rs[:, None] < R) & (cols[None, :] < N), other=0.0)
        acc += tl.dot(a, b, input_precision="ieee" if IEEE else "tf32")
        tl.store(out_ptr + rows[:, None] * som + cols[None, :] * son, acc.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (cols[None, :] < N))


def matmul_lowrank(x: torch.Tensor, y: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                   use_triton: bool = False) -> torch.Tensor:
    """x (M, K) @ y (K, N) + u (M, R) @ v (R, N), all of one dtype; any strides (transposed views are free).

    >>> x, y, u, v = torch.randn(5, 4), torch.randn(4, 3), torch.randn(5, 2), torch.randn(2, 3)
    >>> torch.allclose(matmul_lowrank(x, y, u, v), x @ y + u @ v)
    True
    """
    if not use_triton:
        return (x @ y).addmm_(u, v)
    M, K = x.shape
    N, R = y.shape[1], u.shape[1]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    block_r = max(16, triton.next_power_of_2(R))  # tl.dot needs every dimension >= 16
    grid = (triton.cdiv(M, 64), triton.cdiv(N, 64))
    _matmul_lowrank_kernel[grid](x, y, u, v, out, M, N, K, R, *x.stride(), *y.stride(), *u.stride(), *v.stride(),
                                 *out.stride(), IEEE=x.dtype == torch.float32, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32,
                                 BLOCK_R=block_r)
    return out


class LoRALinearFunction(torch.autograd.Function):
    """x (M, K), frozen weight (N, K) and bias, lora_A (R, K), lora_B (N, R), scale -> (M, N)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, use_triton: bool):
        dtype = x.dtype
        xa = x @ lora_a.to(dtype).T  # (M, R)
        scaled_b = (lora_b * scale).to(dtype)  # (N, R), tiny
        out = matmul_lowrank(x, weight.T, xa, scaled_b.T, use_triton)
        if bias is not None:
            out += bias
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
        ctx.scale, ctx.use_triton = scale, use_triton
        return out

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):  # the loop's backward runs under autocast
            return LoRALinearFunction._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        grad = grad.to(x.dtype)
        dtype, scale = x.dtype, ctx.scale
        gb = grad @ (lora_b * scale).to(dtype)  # (M, R): s·g B
        grad_x = matmul_lowrank(grad, weight, gb, lora_a.to(dtype), ctx.use_triton) if ctx.needs_input_grad[0] \
            else None
        grad_a = (gb.T @ x).to(lora_a.dtype) if ctx.needs_input_grad[3] else None  # (R, K)
        grad_b = ((grad.T @ xa) * scale).to(lora_b.dtype) if ctx.needs_input_grad[4] else None  # (N, R)
        return grad_x, None, None, grad_a, grad_b, None, None


def _fusable(layer: nn.Module) -> bool:
    """Checked at every call: the fused path is exact only in this state."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return False
    name = layer.active_adapters[0]
    return (name in layer.lora_A and name not in getattr(layer, "lora_variant", {})
            and isinstance(layer.lora_dropout[name], nn.Identity) and not layer.base_layer.weight.requires_grad)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs or not _fusable(self):
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
    """Route every eligible peft LoRA linear layer of ``model`` through the fused function; returns
    how many layers were routed. ``kernel``: "blas" (two GEMMs, the second accumulating in place)
    or "triton" (one kernel; on CUDA, or on CPU under TRITON_INTERPRET=1)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if kernel == "triton" and triton is None:
        raise RuntimeError("training.fused_lora: triton needs the triton package (pip install triton)")
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is nn.Linear:
            if not hasattr(module, "_peft_forward"):
                module._peft_forward = module.forward
                module.forward = types.MethodType(_fused_forward, module)
            module._fused_lora_kernel = kernel
            count += 1
    return count
