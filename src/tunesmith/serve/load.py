"""Build what the server serves: one base model, and LoRA adapters on it chosen by name."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from transformers import AutoConfig

from tunesmith.config.schema import ModelConfig
from tunesmith.errors import ModelLoadError
from tunesmith.io import read_json
from tunesmith.models.device import select_device, serving_dtype
from tunesmith.models.inference import Target, load_for_inference, tokenizer_for
from tunesmith.models.load import resolve_model_source
from tunesmith.rundir import PEFT_ADAPTER_CONFIG, adapter_base
from tunesmith.serve.served import Served
from tunesmith.generate.vllm import VLLMModels
from tunesmith.targets import resolve_target


def _adapter_dir(target: Target, flag: str) -> Path:
    """The PEFT adapter folder of a run or an adapter folder."""
    if target.run is not None and not target.run.has_model:
        raise ModelLoadError(f"{flag}{target.spec}: the run has no final model (it did not finish)")
    if target.adapter_kind != "peft":
        raise ModelLoadError(f"{flag}{target.spec}: not a run folder with a LoRA-family adapter, nor such an "
                             "adapter folder")
    return target.model_dir


def build_served(spec: str, adapters: dict[str, str], device: str = "auto", max_tokens: int = 256,
                 dtype: str | None = None) -> Served:
    """``spec`` (a run, model folder, adapter, registry:NAME@ALIAS or 'embedded') plus extra adapters
    named by the request. ``dtype``: a name, or "auto" for ``serving_dtype``'s choice; None: the
    model's own (as training loads it)."""
    target = resolve_target(spec)
    if dtype == "auto":
        dtype = serving_dtype("auto", select_device(device))
    model, tokenizer = load_for_inference(target, device, dtype=dtype)
    served: dict[str, str] = {}
    if isinstance(model, PeftModel):  # the target itself is an adapter run: serve it under its (registered) name
        served[target.name] = "default"
        base_name = Path(adapter_base(target.model_dir)).name or "base"  # as the adapter records its base
    else:
        base_name = target.name
    for name, path in adapters.items():
        if name in served or name == base_name:
            raise ModelLoadError(f"--adapter {name}=...: the name is already served")
        folder = _adapter_dir(resolve_target(path), f"--adapter {name}=")
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
        served[name] = name
    model.eval()
    return Served(model, tokenizer, base_name, served, max_tokens)


def _lora_rank(folder: Path, flag: str) -> int:
    """The rank of a LoRA adapter folder vLLM can serve; ModelLoadError for other adapter kinds."""
    record = read_json(folder / PEFT_ADAPTER_CONFIG)
    kind = record.get("peft_type") if isinstance(record, dict) else None
    if kind != "LORA" or record.get("use_dora"):
        what = "DoRA" if kind == "LORA" else str(kind)
        raise ModelLoadError(f"{flag}: a {what} adapter; vLLM serves LoRA adapters only. Serve it with "
                             "--engine batched, or merge it first (tunesmith export)")
    ranks = [int(record.get("r", 8)), *(int(r) for r in (record.get("rank_pattern") or {}).values())]
    return max(ranks)


def build_for_vllm(spec: str, adapters: dict[str, str], max_tokens: int = 256) -> tuple[Served, VLLMModels]:
    """What the server checks requests with (the tokenizer and template, no weights) and what vLLM loads:
    the base model folder and the LoRA adapter folders (a run's own, and ``adapters``)."""
    target = resolve_target(spec)
    tokenizer = tokenizer_for(target)
    loras: dict[str, str] = {}
    ranks = [0]
    if target.adapter_kind == "peft":
        ranks.append(_lora_rank(_adapter_dir(target, ""), spec))
        base_location = target.base_model or adapter_base(target.model_dir)
        base_name = Path(adapter_base(target.model_dir)).name or "base"
        loras[target.name] = str(target.model_dir)
    elif target.adapter_kind is not None:
        raise ModelLoadError(f"{spec}: a {target.adapter_kind} adapter; vLLM serves LoRA adapters only")
    else:
        base_location = str(target.model_dir) if target.model_dir.exists() else target.location
        base_name = target.name
    base_dir, gguf = resolve_model_source(ModelConfig(name_or_path=base_location))
    if gguf is not None:
        raise ModelLoadError(f"{spec}: a GGUF file; for --engine vllm, serve a Hugging Face model folder")
    for name, path in adapters.items():
        if name in loras or name == base_name:
            raise ModelLoadError(f"--adapter {name}=...: the name is already served")
        folder = _adapter_dir(resolve_target(path), f"--adapter {name}=")
        ranks.append(_lora_rank(folder, f"--adapter {name}={path}"))
        loras[name] = str(folder)
    config = AutoConfig.from_pretrained(base_dir)
    served = Served(None, tokenizer, base_name, {name: name for name in loras}, max_tokens, config=config)
    tokenizer_dir = str(target.model_dir) if target.model_dir.is_dir() else base_dir
    return served, VLLMModels(base_dir, base_name, tokenizer_dir, loras, max(ranks), served.context_length)
