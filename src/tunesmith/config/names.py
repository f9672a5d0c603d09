"""Names the config validates against and the layers above implement: the row formats and the data
file suffixes (data), the metrics and normalisation steps (evaluation), the export targets and GGUF
types (export). They live here, below those layers, so that config never imports them."""

from __future__ import annotations

# Chat-like formats: each row becomes a conversation (or raw text).
CHAT_FORMATS = ("openai", "sharegpt", "alpaca", "qa", "completion", "seed_tasks", "text")
# "unpaired": one reply with a desirable flag (TRL's prompt/completion/label rows), for KTO.
PREFERENCE_FORMATS = ("preference", "openai_preference", "hh", "unpaired")
FORMATS = CHAT_FORMATS + PREFERENCE_FORMATS
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz", ".json.gz")

# `eval --metrics`: scored on generated replies, or from the reference's likelihood; aliases name several.
GENERATION_METRICS = ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match", "json_valid", "regex_match")
LIKELIHOOD_METRICS = ("loss", "perplexity")
METRIC_ALIASES = {"rouge": ("rouge1", "rouge2", "rougeL"), "ppl": ("perplexity",), "em": ("exact_match",)}
# `eval --normalize`: exact_match's normalisation steps, applied in this order.
NORMALISATIONS = ("case", "punct", "articles", "whitespace")

# `export --to`, `--dtype` (name -> torch dtype name) and `--quant` (the GGUF types export.gguf writes).
EXPORT_TARGETS = ("hf", "gguf", "ollama", "bnb-4bit", "bnb-8bit")
EXPORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
