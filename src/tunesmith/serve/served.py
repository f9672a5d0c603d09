"""What the server serves: one base model, its tokenizer, and the adapters loaded on it under their served
names (``load.py`` builds it, ``app.py`` serves it, ``live.py`` adds and removes adapters while it serves).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from tunesmith.serve import structured
from tunesmith.serve.tokens import TokenBytes


@dataclass
class Served:
    """One base model, its tokenizer, and the adapter names loaded on it."""

    model: PreTrainedModel | None  # None: the weights are another engine's (vLLM's)
    tokenizer: PreTrainedTokenizerBase
    base_name: str
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> peft adapter name
    default_max_tokens: int = 256
    grammars: structured.GrammarCompiler | None = field(default=None, repr=False)  # built on first use
    token_bytes: TokenBytes | None = field(default=None, repr=False)  # built on first use
    config: PretrainedConfig | None = field(default=None, repr=False)  # without a model: the model's config

    @property
    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    @property
    def context_length(self) -> int:
        config = self.config if self.model is None else getattr(self.model, "config", None)
        return int(getattr(config, "max_position_embeddings", 2048))

    @property
    def vocab_size(self) -> int:
        """The ids the model has embeddings for (a config's ``vocab_size`` may be absent or disagree)."""
        if self.model is None:
            return int(getattr(self.config, "vocab_size", 0) or len(self.tokenizer))
        return int(self.model.get_input_embeddings().num_embeddings)

    def bytes_of(self, token_id: int) -> list[int]:
        if self.token_bytes is None:
            self.token_bytes = TokenBytes(self.tokenizer)
        return list(self.token_bytes(token_id))
