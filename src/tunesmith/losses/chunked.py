"""Next-token loss without materialising the logits.

A causal LM's head turns (tokens, hidden) into (tokens, vocab) logits: for a 49k-word vocabulary
and 2,048 tokens that is 400 MB in fp32, and autograd keeps it (and a softmax copy) until backward.
Here the head runs only at the positions that carry a label (SFT skips every prompt token), in
chunks, and the gradient of each chunk is taken in the forward pass while its logits exist
(softmax minus one-hot, times the head): backward only scales what was stored, so the head runs
twice per label token (logits, input gradient) instead of three times under activation
checkpointing, and at most one chunk of logits lives at a time. Liger's fused kernel does this in
Triton on GPU and is used there when installed; this version is plain PyTorch and runs everywhere.
A head that is not a plain ``nn.Linear`` (a LoRA-wrapped or quantized head) takes the checkpointed
chunks instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunesmith.data.tokenize import IGNORE_INDEX


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i), its gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        # hidden: (tokens, d); weight: (vocab, d); targets: (tokens,)
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.shape[0], chunk_size):
            piece, answer = hidden[start:start + chunk_size], targets[start:start + chunk_size]
            logits = F.linear(piece, weight, bias).float()  # (chunk, vocab)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, answer[:, None]).squeeze(1)).sum()
            if not (want_hidden or want_weight or want_bias):
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(answer.shape[0], device=grad.device), answer] -= 1.0
            if want_bias:
                grad_bias += grad.sum(0)
            grad = grad.to(weight.dtype)
            if want_hidden:
                grad_hidden[start:start + chunk_size] = grad @ weight
            if want_weight:
                grad_weight += (grad.T @ piece).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output.float()
        return (grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None,
                (grad_weight * scale).to(ctx.dtypes[0]) if grad_weight is not None else None,
                (grad_bias * scale).to(ctx.dtypes[1]) if grad_bias is not None else None, None, None)


def _chunk_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")  # head(hidden): (chunk, vocab)


def _liger():
    """Liger's fused linear cross-entropy, or None where it is not installed."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def chunked_loss_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                     chunk_size: int = 1024, liger: bool = True) -> torch.Tensor:
    """Sum of next-token NLL over label positions, equal to ``sft_loss_sum(head(hidden), labels)``.

    hidden: (batch, seq, hidden) final hidden states; labels: (batch, seq). ``liger``: Liger's
    kernel on CUDA where it is installed (``training.liger``).

    >>> head = nn.Linear(4, 6, bias=False); hidden = torch.randn(2, 5, 4)
    >>> labels = torch.tensor([[-100, 1, 2, 3, -100], [-100, -100, 4, 5, 0]])
    >>> from tunesmith.losses.sft import sft_loss_sum
    >>> torch.allclose(chunked_loss_sum(hidden, head, labels, chunk_size=2), sft_loss_sum(head(hidden), labels))
    True
    """
    targets = labels[:, 1:]  # (batch, seq-1)
    mask = targets != IGNORE_INDEX
    selected = hidden[:, :-1][mask]  # (tokens, hidden): only the positions that predict a label
    wanted = targets[mask]  # (tokens,)
    anchor = hidden[..., :1].sum().float() * 0.0  # attached to the graph: a batch without labels still backpropagates
    if wanted.shape[0] == 0:
        return anchor
    if type(head) is nn.Linear:  # exactly a linear layer: its weight and bias are all there is
        fused = _liger() if liger and hidden.is_cuda else None
        if fused is not None:
            return anchor + fused(selected, head.weight, wanted, bias=head.bias, reduction="sum").float()
        return anchor + LinearCrossEntropy.apply(selected, head.weight, head.bias, wanted, chunk_size)
    total = anchor
    for start in range(0, wanted.shape[0], chunk_size):
        piece, answer = selected[start:start + chunk_size], wanted[start:start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, piece, answer, head, use_reentrant=False)
        else:
            total = total + _chunk_loss(piece, answer, head)
    return total
