"""Next-token cross-entropy summed over label tokens (callers normalise by the token count)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.tokenize import IGNORE_INDEX


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss after the one-position shift.

    >>> count_label_tokens(torch.tensor([[-100, 5, 6, -100], [7, 8, -100, -100]]))
    3
    """
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def sft_loss_sum(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Sum of next-token NLL over positions whose label is not ``IGNORE_INDEX``.

    logits: (batch, seq, vocab); labels: (batch, seq). The sum (not the mean) lets the training
    loop divide by the label tokens of a whole accumulation window, so that batch 1 x accumulation
    8 gives the same gradient as batch 8 x accumulation 1. Sequence chunks bound the fp32 copy of
    the logits that cross-entropy makes.

    >>> logits = torch.zeros(1, 3, 4); labels = torch.tensor([[-100, 1, 2]])
    >>> round(float(sft_loss_sum(logits, labels)), 4)  # two tokens, uniform over 4: 2 * ln 4
    2.7726
    """
    shifted_logits = logits[:, :-1, :]  # (batch, seq-1, vocab)
    shifted_labels = labels[:, 1:]  # (batch, seq-1)
    total = logits[..., :1].sum().float() * 0.0  # attached to the graph: a batch without labels still backpropagates
    for start in range(0, shifted_labels.shape[1], chunk_size):
        chunk_labels = shifted_labels[:, start:start + chunk_size]
        if not (chunk_labels != IGNORE_INDEX).any():
            continue
        chunk_logits = shifted_logits[:, start:start + chunk_size, :].float()  # (batch, chunk, vocab)
        total = total + F.cross_entropy(chunk_logits.reshape(-1, chunk_logits.shape[-1]), chunk_labels.reshape(-1),
                                        ignore_index=IGNORE_INDEX, reduction="sum")
    return total


def kl_to_reference_sum(logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor,
                        chunk_size: int = 1024) -> torch.Tensor:
    """Sum over the label positions of KL(p_model || p_reference) of the next-token distributions.

    logits, reference_logits: (batch, seq, vocab); labels: (batch, seq). The positions are those
    ``sft_loss_sum`` trains, so the regulariser shares its normaliser (label tokens).

    >>> logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]]); labels = torch.tensor([[-100, 1]])
    >>> float(kl_to_reference_sum(logits, logits, labels))  # the same distribution: no divergence
    0.0
    >>> sharp = torch.tensor([[[20.0, -20.0], [0.0, 0.0]]])  # ~certain of token 0 where the base is 50/50
    >>> round(float(kl_to_reference_sum(sharp, logits, labels)), 4)  # log 2
    0.6931
    """
    mask = labels[:, 1:] != IGNORE_INDEX  # (batch, seq-1): the position before each label predicts it
    own_logits, base_logits = logits[:, :-1], reference_logits[:, :-1]  # (batch, seq-1, vocab)
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, mask.shape[1], chunk_size):
        chunk_mask = mask[:, start:start + chunk_size]
        if not chunk_mask.any():
            continue
        own = F.log_softmax(own_logits[:, start:start + chunk_size][chunk_mask].float(), -1)  # (tokens, vocab)
        base = F.log_softmax(base_logits[:, start:start + chunk_size][chunk_mask].float(), -1)
        total = total + (own.exp() * (own - base)).sum()
    return total
