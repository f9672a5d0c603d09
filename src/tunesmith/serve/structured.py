"""Structured output (``response_format``) by constrained decoding with xgrammar.

The grammar is xgrammar's, compiled from the request's JSON schema (or its built-in JSON grammar for
``json_object``); ours is only the glue: a logits processor that masks, at each step, every token the
grammar does not allow. Installed with the ``structured`` extra (``pip install 'tunesmith[structured]'``).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

try:
    import xgrammar
except ImportError:  # the server runs without it; response_format is then refused with a 400
    xgrammar = None


def available() -> bool:
    return xgrammar is not None


class GrammarCompiler:
    """xgrammar's compiler for one model and tokenizer, built on first use (it reads the vocabulary)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int]):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self._compiler: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        with self._lock:
            if self._compiler is None:
                vocab = self.model.get_input_embeddings().num_embeddings  # the logits' width
                info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=max(vocab, len(self.tokenizer)),
                                                               stop_token_ids=self.stop_ids)
                # A bounded cache: every distinct schema compiled would otherwise be kept for good.
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_limit_bytes=64 << 20)
            return self._compiler

    def compile(self, kind: str, schema: dict[str, Any] | None) -> Any:
        """A compiled grammar for ``json_object`` (any JSON object) or ``json_schema``; ValueError, with
        xgrammar's reason, for a schema it cannot compile."""
        compiler = self._get()
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        try:
            return compiler.compile_json_schema(json.dumps(schema or {}), any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as err:
            raise ValueError(f"the JSON schema cannot be compiled to a grammar: {str(err)[:300]}") from None


    def compile_calls(self, calls: list[tuple[str, dict[str, Any], str]]) -> Any:
        """A grammar of exactly one of ``calls``: (text before the arguments, their JSON schema, text
        after); ValueError for a schema xgrammar cannot compile."""
        compiler = self._get()
        try:
            options = [xgrammar.Grammar.concat(*[part for part in (
                _literal(opening), xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False),
                _literal(closing)) if part is not None]) for opening, schema, closing in calls]
            return compiler.compile_grammar(xgrammar.Grammar.union(*options))
        except (RuntimeError, ValueError, TypeError) as err:
            raise ValueError(f"a tool's parameters cannot be compiled to a grammar: {str(err)[:300]}") from None


def _literal(text: str) -> Any:
    """A grammar of exactly ``text`` (None for the empty text)."""
    return xgrammar.Grammar.from_ebnf(f"root ::= {json.dumps(text)}") if text else None


class GrammarRow:
    """The engine's row processor (``engine.RowProcessor``) that masks one completion's logits to the
    tokens ``grammar`` allows next. Once the grammar is complete (or, for a schema no value satisfies,
    stuck) only the stop tokens remain. One instance per completion: it follows the row's tokens."""

    def __init__(self, grammar: Any, stop_ids: list[int]):
        self.matcher = xgrammar.GrammarMatcher(grammar)
        self.stop_ids = stop_ids
        self.accepted = 0  # tokens of the row fed to the matcher
        self.stuck = False
        self.bitmask = xgrammar.allocate_token_bitmask(1, grammar.tokenizer_info.vocab_size)

    def __call__(self, tokens: list[int], logits: torch.Tensor) -> torch.Tensor:
        while self.accepted < len(tokens) and not self.stuck and not self.matcher.is_terminated():
            self.stuck = not self.matcher.accept_token(tokens[self.accepted])
            self.accepted += 1
        if self.stuck or self.matcher.is_terminated():
            return self._only_stop(logits)
        self.matcher.fill_next_token_bitmask(self.bitmask)
        if not bool(self.bitmask.any()):
            self.stuck = True
            return self._only_stop(logits)
        masked = logits.float().cpu()[None]  # (1, vocab)
        xgrammar.apply_token_bitmask_inplace(masked, self.bitmask, vocab_size=masked.shape[-1])
        return masked[0].to(device=logits.device, dtype=logits.dtype)

    def _only_stop(self, logits: torch.Tensor) -> torch.Tensor:
        kept = torch.full_like(logits, float("-inf"))
        kept[self.stop_ids] = logits[self.stop_ids]
        return kept
