"""Load anything a user may want to chat with: a run folder, a model folder, an adapter folder,
a GGUF file, the embedded default or a hub id."""

from __future__ import annotations

import json
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunesmith.config.load import read_yaml
from tunesmith.config.schema import Config, ModelConfig
from tunesmith.errors import ModelLoadError
from tunesmith.models.load import load_model, load_tokenizer, resolve_model_source


def _load_adapter(base_config: ModelConfig, adapter_dir: Path, quantized: Config | None,
                  dequantize: bool = False) -> tuple:
    quantization = quantized.method.quantization if quantized and quantized.method.type == "qlora" else None
    quantization = None if dequantize else quantization
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(adapter_dir), device=base_config.device))
    base = load_model(base_config, quantization)
    return PeftModel.from_pretrained(base, adapter_dir), tokenizer


def load_for_inference(target: str, device: str = "auto", dequantize: bool = False
                       ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for ``target``; a run folder uses the tokenizer and template it trained with.

    A QLoRA run loads its base in 4 bits, as trained, unless ``dequantize`` (for merging).
    """
    path = Path(target).expanduser()
    if (path / "config.yaml").is_file() and (path / "model").is_dir():  # a run folder
        run_config = Config.model_validate(read_yaml(path / "config.yaml"))
        path = path / "model"
        if (path / "adapter_config.json").is_file():
            return _load_adapter(run_config.model.model_copy(update={"device": device}), path, run_config,
                                 dequantize)
    elif path.is_dir() and (path / "config.yaml").is_file():
        raise ModelLoadError(f"{path} is a run folder without a final model (model/): the run did not finish; "
                             f"resume it with `tunesmith train CONFIG --resume`")
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        return _load_adapter(ModelConfig(name_or_path=base, device=device), path, None)
    config = ModelConfig(name_or_path=str(path) if path.exists() else target, device=device)
    source = resolve_model_source(config)  # once: it may probe the hub
    return load_model(config, source=source), load_tokenizer(config, source)


def tokenizer_for(target: str) -> PreTrainedTokenizerBase:
    """The tokenizer (with chat template) of a run folder, model or adapter folder, GGUF file or 'embedded'."""
    path = Path(target).expanduser()
    if (path / "config.yaml").is_file() and (path / "model").is_dir():
        path = path / "model"
    return load_tokenizer(ModelConfig(name_or_path=str(path) if path.exists() else target))


def run_config_of(target: str) -> Config | None:
    """The resolved config of a run folder, or None for anything else."""
    path = Path(target).expanduser()
    if (path / "config.yaml").is_file():
        return Config.model_validate(read_yaml(path / "config.yaml"))
    return None
