"""Each token's own bytes, for the ``bytes`` of OpenAI's chat logprobs: a token may hold part of a
UTF-8 character (``"日"`` is three byte-level tokens in many vocabularies), so its decoded text
alone ("\\ufffd") does not give its bytes. The bytes come from the token's piece in the vocabulary:
byte-level BPE maps each byte to one printable character (GPT-2's table, which transformers
exports), and SentencePiece's byte fallback writes a byte as ``<0xNN>`` and a space as ``▁``."""

from __future__ import annotations

import json
import re

from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_UNICODE_TO_BYTE = {char: byte for byte, char in bytes_to_unicode().items()}


def _decoder_types(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    """The types of the fast tokenizer's decoder and of the decoders it chains ({} for a slow one)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return set()
    state = json.loads(decoder.__getstate__())
    return {state.get("type", "")} | {part.get("type", "") for part in state.get("decoders", [])}


class TokenBytes:
    """``token_bytes(token_id)``: the bytes the token contributes to decoded text.

    >>> from types import SimpleNamespace
    >>> pieces = {0: "æĹ", 1: "Ġhi", 2: "<0xE6>", 3: "▁hi"}
    >>> level = TokenBytes.__new__(TokenBytes); level.pieces, level.byte_level = pieces.get, True
    >>> level(0), level(1)
    (b'\\xe6\\x97', b' hi')
    >>> spm = TokenBytes.__new__(TokenBytes); spm.pieces, spm.byte_level = pieces.get, False
    >>> spm(2), spm(3)
    (b'\\xe6', b' hi')
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.pieces = tokenizer.convert_ids_to_tokens
        self.byte_level = "ByteLevel" in _decoder_types(tokenizer)

    def __call__(self, token_id: int) -> bytes:
        piece = self.pieces(token_id)
        if not isinstance(piece, str):
            return b""
        if self.byte_level:
            return b"".join(bytes([_UNICODE_TO_BYTE[c]]) if c in _UNICODE_TO_BYTE else c.encode() for c in piece)
        if match := _BYTE_PIECE.fullmatch(piece):
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode()
