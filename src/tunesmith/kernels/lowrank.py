"""What both fused LoRA layers run: X Y + U V as two BLAS calls or one Triton kernel (``matmul_lowrank``),
LoRA's forward and backward written out over it, and the state of a peft layer that both fuse in.

The plain layer (kernels/lora.py, over ``nn.Linear``) and the QLoRA one (kernels/qlora.py, over
bitsandbytes' 4-bit ``Linear4bit``) differ only in where the frozen weight comes from; this module is
below both, so that lora.py's ``fuse_lora`` can route 4-bit layers to qlora.py without an import circle.
"""

from __future__ import annotations

import os

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


def lora_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scale: float, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x Wᵀ + b + s·(x Aᵀ) Bᵀ (M, N), x Aᵀ (M, R)) in x's dtype; the second is what the backward keeps.
    Shared by the plain layer's function and QLoRA's (kernels/qlora.py), which passes its dequantised weight."""
    dtype = x.dtype
    xa = x @ lora_a.to(dtype).T  # (M, R)
    scaled_b = (lora_b * scale).to(dtype)  # (N, R), tiny
    out = matmul_lowrank(x, weight.T, xa, scaled_b.T, use_triton)
    if bias is not None:
        out += bias
    return out, xa


def lora_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, lora_a: torch.Tensor,
                  lora_b: torch.Tensor, xa: torch.Tensor, scale: float, use_triton: bool,
                  needs: tuple[bool, bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """(g_x, g_bias, g_A, g_B) of ``lora_forward``, each None where ``needs`` (for x, bias, A, B) says so;
    ``weight`` may be None where g_x is not needed. The bias trains with peft's ``bias: all``. Call it with
    autocast off."""
    grad = grad.to(x.dtype)
    dtype = x.dtype
    gb = grad @ (lora_b * scale).to(dtype)  # (M, R): s·g B
    grad_x = matmul_lowrank(grad, weight, gb, lora_a.to(dtype), use_triton) if needs[0] else None  # (M, K)
    grad_bias = grad.sum(0) if needs[1] else None  # (N,)
    grad_a = (gb.T @ x).to(lora_a.dtype) if needs[2] else None  # (R, K)
    grad_b = ((grad.T @ xa) * scale).to(lora_b.dtype) if needs[3] else None  # (N, R)
    return grad_x, grad_bias, grad_a, grad_b


def fusable(layer: nn.Module) -> bool:
    """Checked at every call: the fused path is exact only in this state."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return False
    name = layer.active_adapters[0]
    return (name in layer.lora_A and name not in getattr(layer, "lora_variant", {})
            and isinstance(layer.lora_dropout[name], nn.Identity) and not layer.base_layer.weight.requires_grad
            and layer.lora_B[name].bias is None)  # peft's lora_bias: a term the fused products do not have
