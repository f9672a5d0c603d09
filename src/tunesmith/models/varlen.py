"""Variable-length attention for padding-free batches, on any device.

A padding-free micro-batch is one long sequence of R rows whose position ids restart at 0 at each
row. With ``sdpa``, transformers turns the restarts into a dense block-diagonal mask over the
whole packed length T, and SDPA then computes all T² scores (an explicit mask disables the causal
kernel's skipping) and throws most away: for 8 Alpaca rows of ~290 tokens that is ~8× the work of
the rows alone, as much as the rest of a 135M model. FlashAttention-2's varlen kernel avoids this
but needs a CUDA build of flash-attn. ``sdpa_varlen`` runs SDPA once per row with ``is_causal``
(so the causal kernel skips the upper triangle too): the cost is the sum of the rows' squares,
and no T×T mask is ever built. On CUDA in half precision PyTorch's own FlashAttention varlen kernel
(``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10) takes all rows in one call instead; the
per-row loop there keeps to the flash and memory-efficient SDPA kernels, because cuDNN's builds a
new execution plan for each new row length (measured on an H100: 1.5 ms of CPU per call, 0.29× the
padded baseline's speed). Batches with an attention mask (padded ones, generation) go to
transformers' own SDPA path unchanged.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_varlen"
try:
    from torch.nn.attention.varlen import varlen_attn
    _VARLEN_ARGS = set(inspect.signature(varlen_attn).parameters)
except ImportError:  # torch < 2.10
    varlen_attn, _VARLEN_ARGS = None, set()
_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def row_bounds(position_ids: torch.Tensor | None, length: int) -> list[tuple[int, int]] | None:
    """[(start, end)] of the packed rows in a (1, length) ``position_ids``; None when it is not a
    packed batch of one sequence (then ordinary attention applies).

    >>> row_bounds(torch.tensor([[0, 1, 2, 0, 1, 0]]), 6)
    [(0, 3), (3, 5), (5, 6)]
    >>> row_bounds(torch.tensor([[0, 1, 2]]), 3) is None  # a single row: plain causal attention
    True
    """
    if position_ids is None or position_ids.shape[0] != 1 or position_ids.shape[-1] != length:
        return None
    steps = position_ids[0, 1:] - position_ids[0, :-1]
    starts = [0] + [int(i) + 1 for i in torch.nonzero(steps != 1).flatten().tolist()]
    if len(starts) == 1:
        return None
    return list(zip(starts, [*starts[1:], length]))


_last: tuple[weakref.ref, list[tuple[int, int]] | None, dict] | None = None


def _bounds_once(position_ids: torch.Tensor | None, length: int) -> tuple[list[tuple[int, int]] | None, dict]:
    """``row_bounds``, found once per forward, and a per-forward cache for what derives from them:
    every layer gets the same position-id tensor, and reading it back costs a device sync (30 of
    them per forward for a 30-layer model otherwise)."""
    global _last
    if position_ids is None:
        return None, {}
    if _last is not None and _last[0]() is position_ids:
        return _last[1], _last[2]
    bounds = row_bounds(position_ids, length)
    _last = (weakref.ref(position_ids), bounds, {})
    return bounds, _last[2]


def _flash_varlen(query, key, value, bounds, cache, scaling):
    """All rows in one FlashAttention varlen call: query (1, heads, T, dim) -> (1, T, heads, dim)."""
    if "cu" not in cache:
        starts = [s for s, _ in bounds] + [bounds[-1][1]]
        cache["cu"] = torch.tensor(starts, dtype=torch.int32, device=query.device)
        cache["max"] = max(e - s for s, e in bounds)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, dim)
    extra = {}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in _VARLEN_ARGS:
            extra["enable_gqa"] = True
        else:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    if "window_size" in _VARLEN_ARGS:
        extra["window_size"] = (-1, 0)  # causal
    else:
        extra["is_causal"] = True
    out = varlen_attn(q, k, v, cache["cu"], cache["cu"], cache["max"], cache["max"], scale=scaling, **extra)
    return out.unsqueeze(0)


def varlen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """Attention with transformers' interface: query (batch, heads, seq, dim), key and value
    (batch, kv_heads, seq, dim) -> (batch, seq, heads, dim)."""
    bounds, cache = None, {}
    if attention_mask is None and kwargs.get("past_key_values") is None and query.shape[2] == key.shape[2]:
        bounds, cache = _bounds_once(kwargs.get("position_ids"), query.shape[2])
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if (query.is_cuda and varlen_attn is not None and dropout == 0.0
            and query.dtype in (torch.float16, torch.bfloat16) and query.dtype == key.dtype == value.dtype):
        return _flash_varlen(query, key, value, bounds, cache, scaling), None
    gqa = query.shape[1] != key.shape[1]
    with sdpa_kernel(_NO_CUDNN) if query.is_cuda else nullcontext():
        pieces = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                                 dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
                  for s, e in bounds]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask for a batch without padding (the rows come from the position ids); SDPA's own mask otherwise."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(NAME, varlen_attention)
AttentionMaskInterface.register(NAME, varlen_mask)
