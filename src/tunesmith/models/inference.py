"""Load anything a user may want to use: a run folder, a model folder, an adapter folder, a GGUF
file, the embedded default or a hub id; with the LM head (chat, eval, export, serve) or the scoring
head (a reward model).

A target is looked at once (``inspect_target``) and the result passed on; ``registry:`` names are
resolved a layer up (``tunesmith.targets``), so models never import the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunesmith.adapters.bottleneck import load_bottleneck
from tunesmith.config.schema import Config, ModelConfig
from tunesmith.errors import ModelLoadError
from tunesmith.models.load import load_model, load_tokenizer, resolve_model_source
from tunesmith.rundir import AdapterKind, RunDir, adapter_base, adapter_kind, is_run_dir

Head = Literal["lm", "score"]


@dataclass(frozen=True)
class Target:
    """What a model name points at, looked at once: ``location`` is a local path or a name (hub id,
    'embedded'); ``run`` is set for a run folder; ``registered`` is the registry name it came from."""

    spec: str
    location: str
    run: RunDir | None = None
    registered: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.location).expanduser()

    @property
    def model_dir(self) -> Path:
        """The folder with the weights (a run's model/), or the location itself."""
        return self.run.require_model() if self.run is not None else self.path

    @property
    def adapter_kind(self) -> AdapterKind | None:
        return adapter_kind(self.model_dir) if self.model_dir.is_dir() else None

    @cached_property
    def config(self) -> Config | None:
        """The run's config (None for anything but a run folder); read once per target."""
        return self.run.config() if self.run is not None else None

    @property
    def base_model(self) -> str | None:
        """The base model of a run or an adapter folder; None for a full model."""
        if self.run is not None:
            return self.config.model.name_or_path  # the config this target already read
        return adapter_base(self.path) if self.adapter_kind else None

    @property
    def name(self) -> str:
        """A short name to show or serve it under."""
        return self.registered or self.path.name or self.location


def inspect_target(location: str, spec: str | None = None, registered: str | None = None) -> Target:
    """A local name looked at: a run folder (finished or not), or anything else as given."""
    if location.startswith("registry:"):
        raise ModelLoadError(f"{location}: registry names are resolved by tunesmith.targets.resolve_target")
    path = Path(location).expanduser()
    return Target(spec or location, location, RunDir(path) if is_run_dir(path) else None, registered)


def _tokenizer_folder(target: Target) -> Path | None:
    folder = target.model_dir
    return folder if folder.exists() else None


def _load_adapter(target: Target, device: str, dequantize: bool, head: Head, dtype: str | None = None) -> tuple:
    """A base model with the PEFT or bottleneck adapter of ``target``, and the adapter's tokenizer (which
    carries the run's template and any tokens the run added)."""
    folder = target.model_dir
    config = target.config
    if config is not None:
        base_config = config.model.model_copy(update={"device": device, "add_tokens": None,
                                                      "dtype": dtype or config.model.dtype})
        quantization = config.method.quantization if config.method.type == "qlora" and not dequantize else None
    else:
        base_config = ModelConfig(name_or_path=adapter_base(folder), device=device, dtype=dtype or "auto")
        quantization = None
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(folder), device=device))
    base = load_model(base_config, quantization, head=head)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:  # the run added tokens
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if adapter_kind(folder) == "bottleneck":
        return load_bottleneck(base, folder), tokenizer
    return PeftModel.from_pretrained(base, folder), tokenizer


def load_for_inference(target: Target | str, device: str = "auto", dequantize: bool = False, head: Head = "lm",
                       dtype: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for ``target``; a run folder uses the tokenizer and template it trained with.

    A QLoRA run loads its base in 4 bits, as trained, unless ``dequantize`` (for merging). ``head``
    "score" loads a reward model (a ``task: reward`` run, or a sequence-classification folder).
    ``dtype`` (a name) overrides the run's or the model's own (``auto``).
    """
    target = inspect_target(target) if isinstance(target, str) else target
    if target.run is not None:
        config = target.config
        if head == "score" and config.task != "reward":
            raise ModelLoadError(f"{target.spec} is a task {config.task} run, not a reward model (task: reward)")
        if head == "lm" and config.task == "reward":
            raise ModelLoadError(f"{target.spec} is a reward model (task: reward); score rows with "
                                 f"`tunesmith reward score {target.spec} --file ROWS`")
    folder = target.model_dir
    if folder.is_dir() and adapter_kind(folder):
        return _load_adapter(target, device, dequantize, head, dtype)
    config = ModelConfig(name_or_path=str(folder) if folder.exists() else target.location, device=device,
                         dtype=dtype or "auto")
    source = resolve_model_source(config)  # once: it may probe the hub
    return load_model(config, source=source, head=head), load_tokenizer(config, source)


def merged_for_scoring(model: PreTrainedModel) -> PreTrainedModel:
    """A LoRA-family adapter merged into its base in memory: the same outputs (up to float rounding)
    at the base model's speed, for evaluation. A quantized base, and other adapter kinds, stay as they are."""
    if isinstance(model, PeftModel) and not getattr(model.base_model.model, "is_quantized", False):
        try:
            return model.merge_and_unload()
        except (ValueError, NotImplementedError, AttributeError):  # prompt/prefix tuning has nothing to merge
            return model
    return model


def tokenizer_for(target: Target | str) -> PreTrainedTokenizerBase:
    """The tokenizer (with chat template) of a run folder, model or adapter folder, GGUF file or 'embedded'."""
    target = inspect_target(target) if isinstance(target, str) else target
    folder = _tokenizer_folder(target)
    return load_tokenizer(ModelConfig(name_or_path=str(folder) if folder is not None else target.location))
