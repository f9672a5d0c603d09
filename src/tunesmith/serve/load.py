"""Build what the server serves: one base model, and LoRA adapters on it chosen by name."""

from __future__ import annotations

import json
from pathlib import Path

from peft import PeftModel

from tunesmith.errors import ModelLoadError
from tunesmith.models.inference import load_for_inference, resolve_target
from tunesmith.serve.app import Served


def _adapter_dir(target: str) -> Path:
    path = Path(target)
    if (path / "model" / "adapter_config.json").is_file():
        return path / "model"
    if (path / "adapter_config.json").is_file():
        return path
    raise ModelLoadError(f"--adapter {target}: not a run folder with an adapter, nor an adapter folder")


def build_served(target: str, adapters: dict[str, str], device: str = "auto", max_tokens: int = 256) -> Served:
    """``target`` (a run, model folder, adapter, registry:NAME@ALIAS or 'embedded') plus extra adapters
    named by the request."""
    registered = target[len("registry:"):] if target.startswith("registry:") else None
    target = resolve_target(target)
    model, tokenizer = load_for_inference(target, device)
    served: dict[str, str] = {}
    if isinstance(model, PeftModel):  # the target itself is an adapter run: serve it under its (registered) name
        served[registered or Path(target).name] = "default"
        config = json.loads((_adapter_dir(target) / "adapter_config.json").read_text())
        base_name = Path(config["base_model_name_or_path"]).name or "base"
    else:
        base_name = registered or Path(target).name or target
    for name, path in adapters.items():
        if name in served or name == base_name:
            raise ModelLoadError(f"--adapter {name}=...: the name is already served")
        if isinstance(model, PeftModel):
            model.load_adapter(str(_adapter_dir(path)), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, str(_adapter_dir(path)), adapter_name=name)
        served[name] = name
    model.eval()
    return Served(model, tokenizer, base_name, served, max_tokens)
