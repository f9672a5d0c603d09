"""Load anything a user may want to chat with: a run folder, a model folder, an adapter folder,
a GGUF file, the embedded default or a hub id."""

from __future__ import annotations

import json
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunesmith.adapters.bottleneck import BOTTLENECK_CONFIG, load_bottleneck, read_bottleneck_config
from tunesmith.config.load import read_yaml
from tunesmith.config.schema import Config, ModelConfig
from tunesmith.errors import ModelLoadError
from tunesmith.models.load import load_model, load_tokenizer, resolve_model_source


def _load_adapter(base_config: ModelConfig, adapter_dir: Path, quantized: Config | None,
                  dequantize: bool = False) -> tuple:
    """A base model with the PEFT or bottleneck adapter of ``adapter_dir``, and the adapter's tokenizer."""
    quantization = quantized.method.quantization if quantized and quantized.method.type == "qlora" else None
    quantization = None if dequantize else quantization
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(adapter_dir), device=base_config.device))
    base = load_model(base_config.model_copy(update={"add_tokens": None}), quantization)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:  # the run added tokens
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if (adapter_dir / BOTTLENECK_CONFIG).is_file():
        return load_bottleneck(base, adapter_dir), tokenizer
    return PeftModel.from_pretrained(base, adapter_dir), tokenizer


def _is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() or (path / BOTTLENECK_CONFIG).is_file()


def _adapter_base(path: Path) -> str:
    if (path / BOTTLENECK_CONFIG).is_file():
        return read_bottleneck_config(path)["base_model_name_or_path"]
    return json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]


def resolve_target(target: str) -> str:
    """``registry:NAME@ALIAS`` (or ``/VERSION``) -> the registered version's local folder; anything else as is."""
    if target.startswith("registry:"):
        from tunesmith.registry import resolve

        return str(resolve(target))
    return target


def load_for_inference(target: str, device: str = "auto", dequantize: bool = False
                       ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for ``target``; a run folder uses the tokenizer and template it trained with.

    A QLoRA run loads its base in 4 bits, as trained, unless ``dequantize`` (for merging).
    """
    target = resolve_target(target)
    path = Path(target).expanduser()
    if (path / "config.yaml").is_file() and (path / "model").is_dir():  # a run folder
        run_config = Config.model_validate(read_yaml(path / "config.yaml"))
        path = path / "model"
        if _is_adapter(path):
            return _load_adapter(run_config.model.model_copy(update={"device": device}), path, run_config,
                                 dequantize)
    elif path.is_dir() and (path / "config.yaml").is_file():
        raise ModelLoadError(f"{path} is a run folder without a final model (model/): the run did not finish; "
                             f"resume it with `tunesmith train CONFIG --resume`")
    if _is_adapter(path):
        return _load_adapter(ModelConfig(name_or_path=_adapter_base(path), device=device), path, None)
    config = ModelConfig(name_or_path=str(path) if path.exists() else target, device=device)
    source = resolve_model_source(config)  # once: it may probe the hub
    return load_model(config, source=source), load_tokenizer(config, source)


def merged_for_scoring(model: PreTrainedModel) -> PreTrainedModel:
    """A LoRA-family adapter merged into its base in memory: the same outputs (up to float rounding)
    at the base model's speed, for evaluation. A quantized base, and other adapter kinds, stay as they are."""
    if isinstance(model, PeftModel) and not getattr(model.base_model.model, "is_quantized", False):
        try:
            return model.merge_and_unload()
        except (ValueError, NotImplementedError, AttributeError):  # prompt/prefix tuning has nothing to merge
            return model
    return model


def tokenizer_for(target: str) -> PreTrainedTokenizerBase:
    """The tokenizer (with chat template) of a run folder, model or adapter folder, GGUF file or 'embedded'."""
    path = Path(resolve_target(target)).expanduser()
    if (path / "config.yaml").is_file() and (path / "model").is_dir():
        path = path / "model"
    return load_tokenizer(ModelConfig(name_or_path=str(path) if path.exists() else target))


def run_config_of(target: str) -> Config | None:
    """The resolved config of a run folder (a registered version too), or None for anything else."""
    path = Path(resolve_target(target)).expanduser()
    if (path / "config.yaml").is_file():
        return Config.model_validate(read_yaml(path / "config.yaml"))
    return None
