"""The PEFT adapters a serving engine adds and removes while it serves (``Engine.add_adapter`` and
``remove_adapter``): which folders hold one it can load (LoRA-family, not prompt learning), whether one
fits the served model, and the load and unload themselves. The first adapter of a model without peft
wraps it in ``PeftModel``; removing the last one unwraps it again. The engine calls these on its own
thread, between two decoding steps; a load that fails leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftConfig, PeftModel, PeftType
from transformers import PreTrainedModel

from tunesmith.rundir import PEFT_ADAPTER_CONFIG

LIVE_ADAPTER_TYPES = (PeftType.LORA, PeftType.LOHA, PeftType.LOKR)  # what add_adapter loads (LoRA includes DoRA)


def mixable(config: PeftConfig) -> bool:
    """Whether peft can run this adapter per row (``adapter_names``): LoRA, not DoRA."""
    return config.peft_type == PeftType.LORA and not getattr(config, "use_dora", False)


def read_adapter_config(folder: Path) -> PeftConfig:
    """The config of the LoRA-family PEFT adapter in ``folder``, for inference; ValueError saying what
    else the folder is."""
    if not (folder / PEFT_ADAPTER_CONFIG).is_file():
        raise ValueError(f"{folder}: not a PEFT adapter folder (it has no {PEFT_ADAPTER_CONFIG}); give the folder "
                         "that peft's save_pretrained wrote (a run's model/ folder)")
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except Exception as error:
        raise ValueError(f"{folder / PEFT_ADAPTER_CONFIG}: not a PEFT adapter config peft can read ({error})") from error
    kinds = ", ".join(kind.value for kind in LIVE_ADAPTER_TYPES)
    if config.is_prompt_learning or config.is_adaption_prompt:
        raise ValueError(f"{folder}: a {config.peft_type.value} adapter, which learns a prompt and cannot join a "
                         f"model that serves others; live adapters are LoRA-family ({kinds})")
    if config.peft_type not in LIVE_ADAPTER_TYPES:
        raise ValueError(f"{folder}: a {config.peft_type.value} adapter; live adapters are LoRA-family ({kinds})")
    config.inference_mode = True
    return config


def check_fit(missing: list[str], unexpected: list[str]) -> None:
    """ValueError unless the adapter's weights filled exactly the modules it adapts in the model (a tensor
    of another shape fails the load itself). Shapes catch another architecture or width; these keys
    catch another depth, which peft loads without a word (the extra weights dropped, the modules
    without weights left at their initialisation)."""
    if unexpected:
        raise ValueError(f"{len(unexpected)} of its weights are for modules the model lacks ({unexpected[0]}, ...)")
    if missing:
        raise ValueError(f"{len(missing)} weights of the modules it adapts are not in it ({missing[0]}, ...)")


@contextmanager
def load_adapter(model: PreTrainedModel, name: str, folder: Path, config: PeftConfig,
                 device: torch.device) -> Iterator[PeftModel]:
    """``model`` with the adapter in ``folder`` (``config``: ``read_adapter_config``'s) loaded as ``name``, wrapped
    in ``PeftModel`` if it was not. The load stands once the ``with`` body is done; if the load or the body
    fails, it is undone (a wrapped model unwrapped, its layers restored) and ValueError says why."""
    loaded: PeftModel | None = None
    try:
        if isinstance(model, PeftModel):
            loaded = model
        else:  # as PeftModel.from_pretrained builds it, kept at hand to be unwrapped if the load fails
            loaded = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)(model, config, name)
        result = loaded.load_adapter(str(folder), adapter_name=name, torch_device=str(device))
        check_fit(result.missing_keys, result.unexpected_keys)
        yield loaded
    except Exception as error:
        if loaded is model and name in loaded.peft_config:
            loaded.delete_adapter(name)
        elif loaded is not None and loaded is not model:
            loaded.unload()  # the plain model again, its layers restored
        trained, served = config.base_model_name_or_path, getattr(model.config, "name_or_path", "")
        bases = f"; it was trained on {trained!r}, the server serves {served!r}" if trained and served else ""
        raise ValueError(f"{folder}: cannot load the adapter on the served model "
                         f"({' '.join(str(error).split())[:400]}){bases}") from error


def unload_adapter(model: PeftModel, name: str) -> PreTrainedModel:
    """``model`` without its adapter ``name``: deleted, or for its last adapter the plain model, unwrapped."""
    if set(model.peft_config) == {name}:
        return model.unload()
    model.delete_adapter(name)
    return model
