"""tunesmith: fine-tune open-weight language models on one machine."""

__version__ = "0.1.0"
