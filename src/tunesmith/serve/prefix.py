"""Prefix caching for the batching engine: the keys and values of recent prompts' first tokens, so
that a prompt which begins like an earlier one (the chat template's system prompt, a shared few-shot
preamble, a conversation's earlier turns) is prefilled from where they part.

Prompts are cut into blocks of ``block`` tokens (8: SmolLM2's chat template writes 24 tokens
before the user's words, three whole blocks). An entry holds one prompt's keys and values for all
its whole blocks but the last token (a prefill needs at least one token, for the logits of the
next); it is found by the chained hash of any of its block boundaries, so a new prompt that shares
only its first blocks with the entry reuses those. Keys and values depend on the adapter (LoRA on
``k_proj``/``v_proj``), so the chain starts from the adapter's name. Entries are evicted least
recently used first, past ``capacity_bytes``.

Why ours: transformers' caches hold one batch's state; vLLM's automatic prefix caching lives inside
its paged KV pool. This engine keeps plain ``DynamicCache`` rows, so the cache is of that shape.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class _Entry:
    tokens: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values, (heads, length, head_dim)
    nbytes: int
    keys: list[int]  # the block hashes that point at this entry


class PrefixCache:
    """``match(adapter, prompt)`` -> (cached length, per-layer keys/values sliced to it), and
    ``add(adapter, prompt, layers)``; sizes in tokens are multiples of ``block``."""

    def __init__(self, capacity_bytes: int, block: int = 8):
        self.capacity_bytes, self.block = capacity_bytes, block
        self.entries: OrderedDict[int, _Entry] = OrderedDict()  # by id, least recently used first
        self.index: dict[int, tuple[int, int]] = {}  # block hash -> (entry id, prefix length)
        self.nbytes = 0
        self.hits = self.hit_tokens = 0
        self._next_id = 0

    def _hashes(self, adapter: str | None, prompt: list[int]) -> list[int]:
        """The chained hash at each whole block that leaves at least one token of ``prompt`` after it."""
        hashes, running = [], hash(("tunesmith-prefix", adapter))
        for end in range(self.block, len(prompt), self.block):
            running = hash((running, tuple(prompt[end - self.block:end])))
            hashes.append(running)
        return hashes

    def match(self, adapter: str | None, prompt: list[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The longest cached prefix of ``prompt`` for ``adapter``: (its length, each layer's keys and
        values for it); (0, []) when none."""
        for hashed in reversed(self._hashes(adapter, prompt)):
            found = self.index.get(hashed)
            if found is None:
                continue
            entry_id, length = found
            entry = self.entries[entry_id]
            if entry.tokens[:length] != prompt[:length]:  # a hash collision: not this prefix
                continue
            self.entries.move_to_end(entry_id)
            self.hits += 1
            self.hit_tokens += length
            return length, [(keys[:, :length], values[:, :length]) for keys, values in entry.layers]
        return 0, []

    def covers(self, adapter: str | None, prompt: list[int]) -> bool:
        """Whether all of ``prompt``'s whole blocks are cached already (then ``add`` would keep nothing)."""
        hashes = self._hashes(adapter, prompt)
        return not hashes or hashes[-1] in self.index

    def add(self, adapter: str | None, prompt: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep ``prompt``'s keys and values (per layer, (heads, len(prompt), head_dim)) for its whole
        blocks, unless they are all cached already."""
        hashes = self._hashes(adapter, prompt)
        if not hashes or hashes[-1] in self.index:
            return
        length = len(hashes) * self.block
        kept = [(keys[:, :length].clone(), values[:, :length].clone()) for keys, values in layers]
        nbytes = sum(k.nbytes + v.nbytes for k, v in kept)
        if nbytes > self.capacity_bytes:
            return
        while self.nbytes + nbytes > self.capacity_bytes:
            self._evict()
        entry_id, self._next_id = self._next_id, self._next_id + 1
        fresh = [h for h in hashes if h not in self.index]
        self.entries[entry_id] = _Entry(prompt[:length], kept, nbytes, fresh)
        for position, hashed in enumerate(hashes):
            if hashed in fresh:
                self.index[hashed] = (entry_id, (position + 1) * self.block)
        self.nbytes += nbytes

    def _evict(self) -> None:
        entry_id, entry = self.entries.popitem(last=False)
        for hashed in entry.keys:
            if self.index.get(hashed, (None,))[0] == entry_id:
                del self.index[hashed]
        self.nbytes -= entry.nbytes
