"""Build what the server serves: one base model, and LoRA adapters on it chosen by name."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from tunesmith.errors import ModelLoadError
from tunesmith.models.inference import Target, load_for_inference
from tunesmith.rundir import adapter_base
from tunesmith.serve.app import Served
from tunesmith.targets import resolve_target


def _adapter_dir(target: Target, flag: str) -> Path:
    """The PEFT adapter folder of a run or an adapter folder."""
    if target.run is not None and not target.run.has_model:
        raise ModelLoadError(f"{flag}{target.spec}: the run has no final model (it did not finish)")
    if target.adapter_kind != "peft":
        raise ModelLoadError(f"{flag}{target.spec}: not a run folder with a LoRA-family adapter, nor such an "
                             "adapter folder")
    return target.model_dir


def build_served(spec: str, adapters: dict[str, str], device: str = "auto", max_tokens: int = 256) -> Served:
    """``spec`` (a run, model folder, adapter, registry:NAME@ALIAS or 'embedded') plus extra adapters
    named by the request."""
    target = resolve_target(spec)
    model, tokenizer = load_for_inference(target, device)
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
