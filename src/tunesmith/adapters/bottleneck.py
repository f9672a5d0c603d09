"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) for Llama-like decoders.

A small residual block ``x + up(dropout(act(down(LayerNorm(x)))))`` is inserted after a
sub-layer's output while every base weight stays frozen:

* ``pfeiffer``: after each decoder layer's ``mlp``;
* ``houlsby``: after each decoder layer's ``self_attn`` and ``mlp``.

``up`` starts at zero, so a freshly adapted model computes exactly what the base model computes.

Only the adapter weights are saved, under names that do not depend on how they are wired in
(``layers.3.mlp_adapter.down.weight``), to ``bottleneck_adapter.safetensors`` beside a
``bottleneck_config.json`` that records the :class:`AdapterConfig` and the base model.

Why our own: peft has no bottleneck adapters, and AdapterHub's ``adapters`` (1.3.0) requires
transformers ~=4.57, while tunesmith runs on transformers 5.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from tunesmith.config.schema import AdapterConfig
from tunesmith.errors import ConfigError, ModelLoadError
from tunesmith.rundir import BOTTLENECK_CONFIG  # the folder layout lives in rundir

BOTTLENECK_WEIGHTS = "bottleneck_adapter.safetensors"
FORMAT_VERSION = 1
CONFIG_ATTRIBUTE = "tunesmith_bottleneck"
DOWN_INIT_STD = 0.02

# Which decoder-layer sub-modules each style adapts, and the adapter's stable name for each.
STYLE_TARGETS: dict[str, tuple[str, ...]] = {"pfeiffer": ("mlp",), "houlsby": ("self_attn", "mlp")}
ADAPTER_NAMES: dict[str, str] = {"self_attn": "attn_adapter", "mlp": "mlp_adapter"}

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def bottleneck_width(hidden_size: int, reduction_factor: int) -> int:
    """The adapter's inner width: ``hidden_size // reduction_factor``, which must be at least 1.

    >>> bottleneck_width(576, 16)
    36
    >>> bottleneck_width(32, 64)
    Traceback (most recent call last):
    ...
    tunesmith.errors.ConfigError: invalid config (1 problem):
      - method.adapter.reduction_factor: 64 leaves no bottleneck for hidden size 32; use at most 32
    """
    width = hidden_size // reduction_factor
    if width < 1:
        raise ConfigError([f"method.adapter.reduction_factor: {reduction_factor} leaves no bottleneck for hidden "
                           f"size {hidden_size}; use at most {hidden_size}"])
    return width


class BottleneckAdapter(nn.Module):
    """``x + up(dropout(act(down(LayerNorm(x)))))``; the identity until ``up`` learns.

    >>> adapter = BottleneckAdapter(hidden_size=8, width=2)
    >>> x = torch.randn(2, 3, 8)  # (batch, seq, hidden)
    >>> torch.equal(adapter(x), x)
    True
    >>> [name for name, _ in adapter.named_parameters()]
    ['norm.weight', 'norm.bias', 'down.weight', 'down.bias', 'up.weight', 'up.bias']
    """

    def __init__(self, hidden_size: int, width: int, non_linearity: str = "relu", dropout: float = 0.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(hidden_size, **factory)
        self.down = nn.Linear(hidden_size, width, **factory)
        self.act = ACTIVATIONS[non_linearity]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(width, hidden_size, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small normal ``down``, zero ``up``: the adapter starts as the identity."""
        self.norm.reset_parameters()
        nn.init.normal_(self.down.weight, std=DOWN_INIT_STD)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = x.to(self.down.weight.dtype)  # fp32 adapter weights under a bf16 base (no autocast on CPU)
        h = self.down(self.norm(inner))  # (..., width)
        h = self.dropout(self.act(h))  # (..., width)
        return x + self.up(h).to(x.dtype)  # (..., hidden)


class AdaptedSublayer(nn.Module):
    """A decoder sub-layer (``self.base``) whose output goes through ``self.adapter``.

    A tensor output is adapted directly. A tuple output (attention returns ``(hidden, weights)``)
    has its first element adapted and the rest passed through unchanged. Attributes the wrapper
    lacks (``layer_idx``, ``gate_proj``, ...) are looked up on the base module.
    """

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.enabled = True  # False inside bottlenecks_disabled(): the base sub-layer alone

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.base(*args, **kwargs)
        if not self.enabled:
            return output
        if isinstance(output, torch.Tensor):
            return self.adapter(output)  # (batch, seq, hidden)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (self.adapter(output[0]), *output[1:])
        raise TypeError(f"{type(self.base).__name__} returned {type(output).__name__}; a bottleneck adapter "
                        "needs a tensor or a tuple whose first element is the hidden states")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "adapter"):
                raise
            return getattr(self.base, name)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers``, checked to hold ``self_attn`` and ``mlp`` in every layer."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ConfigError([f"method.type: adapter: {type(model).__name__} has no decoder layers at model.model.layers; "
                           "bottleneck adapters support Llama-like models only (use lora instead)"])
    for index, layer in enumerate(layers):
        missing = [name for name in ("self_attn", "mlp") if not isinstance(getattr(layer, name, None), nn.Module)]
        if missing:
            raise ConfigError([f"method.type: adapter: decoder layer {index} ({type(layer).__name__}) has no "
                               f"{' or '.join(missing)} sub-module; bottleneck adapters support Llama-like models "
                               "only (use lora instead)"])
    return layers


def _hidden_size(model: PreTrainedModel) -> int:
    hidden_size = getattr(model.config, "hidden_size", None)
    if not isinstance(hidden_size, int):
        raise ConfigError([f"method.type: adapter: {type(model).__name__}.config has no integer hidden_size"])
    return hidden_size


def _reference_parameter(module: nn.Module) -> torch.Tensor:
    """A floating-point parameter of ``module``, whose dtype and device the adapter copies."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter
    raise ConfigError([f"method.type: adapter: {type(module).__name__} has no floating-point weights to match"])


def add_bottleneck_adapters(model: PreTrainedModel, config: AdapterConfig) -> PreTrainedModel:
    """Freeze ``model`` and wrap each targeted sub-layer with a new adapter; returns ``model`` itself."""
    if is_bottleneck(model):
        raise ConfigError(["method.type: adapter: this model already has bottleneck adapters"])
    layers = _decoder_layers(model)
    hidden_size = _hidden_size(model)
    width = bottleneck_width(hidden_size, config.reduction_factor)
    model.requires_grad_(False)
    for layer in layers:
        for target in STYLE_TARGETS[config.style]:
            base = getattr(layer, target)
            reference = _reference_parameter(base)
            # fp32 whatever the base: in bf16 a LayerNorm weight of 1.0 cannot take an update below
            # 0.004, so the adapter would not train (peft keeps its adapters in fp32 for the same reason)
            adapter = BottleneckAdapter(hidden_size, width, config.non_linearity, config.dropout,
                                        device=reference.device, dtype=torch.float32)
            adapter.requires_grad_(True)
            setattr(layer, target, AdaptedSublayer(base, adapter))
    setattr(model, CONFIG_ATTRIBUTE, config)
    return model


def is_bottleneck(model: nn.Module) -> bool:
    """Whether :func:`add_bottleneck_adapters` has been applied to ``model``."""
    return isinstance(getattr(model, CONFIG_ATTRIBUTE, None), AdapterConfig)


def _adapters(model: nn.Module) -> dict[str, BottleneckAdapter]:
    """Each adapter under its stable prefix, e.g. ``layers.0.mlp_adapter``, in layer order."""
    if not is_bottleneck(model):
        raise ConfigError(["method.type: adapter: this model has no bottleneck adapters "
                           "(call add_bottleneck_adapters first)"])
    found: dict[str, BottleneckAdapter] = {}
    for index, layer in enumerate(_decoder_layers(model)):
        for target, name in ADAPTER_NAMES.items():
            wrapped = getattr(layer, target)
            if isinstance(wrapped, AdaptedSublayer):
                found[f"layers.{index}.{name}"] = wrapped.adapter
    return found


@contextmanager
def bottlenecks_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base: every adapter bypassed until the block exits (the KL-to-base
    reference, with no second copy of the model)."""
    wrappers = [m for m in model.modules() if isinstance(m, AdaptedSublayer)]
    for wrapper in wrappers:
        wrapper.enabled = False
    try:
        yield
    finally:
        for wrapper in wrappers:
            wrapper.enabled = True


def _remove_adapters(model: nn.Module) -> None:
    """Put each wrapped sub-layer back in place (base weights stay frozen)."""
    for layer in _decoder_layers(model):
        for target in ADAPTER_NAMES:
            wrapped = getattr(layer, target)
            if isinstance(wrapped, AdaptedSublayer):
                setattr(layer, target, wrapped.base)
    delattr(model, CONFIG_ATTRIBUTE)


def bottleneck_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights, named ``layers.<i>.<attn|mlp>_adapter.<norm|down|up>.<weight|bias>``."""
    return {f"{prefix}.{name}": tensor
            for prefix, adapter in _adapters(model).items()
            for name, tensor in adapter.state_dict().items()}


def save_bottleneck(model: PreTrainedModel, directory: Path, base_model_name_or_path: str) -> None:
    """Write the adapter weights (safetensors) and their config into the existing ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a folder; create it before saving the adapter")
    tensors = {name: tensor.to("cpu").contiguous() for name, tensor in bottleneck_state_dict(model).items()}
    config: AdapterConfig = getattr(model, CONFIG_ATTRIBUTE)
    save_file(tensors, str(directory / BOTTLENECK_WEIGHTS), metadata={"format": "pt"})
    record = {
        **config.model_dump(),
        "base_model_name_or_path": base_model_name_or_path,
        "hidden_size": _hidden_size(model),
        "num_layers": len(_decoder_layers(model)),
        "format_version": FORMAT_VERSION,
    }
    (directory / BOTTLENECK_CONFIG).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_bottleneck_config(directory: Path) -> dict[str, Any]:
    """The saved ``bottleneck_config.json`` as a dict, its format version and keys checked."""
    path = Path(directory) / BOTTLENECK_CONFIG
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: not found; is {directory} a saved bottleneck adapter?") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{path}: cannot read it as JSON ({error})") from None
    if not isinstance(record, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(record).__name__}")
    if record.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{path}: format_version is {record.get('format_version')!r}; this tunesmith reads "
                             f"{FORMAT_VERSION} (save the adapter again with this version)")
    missing = [key for key in ("base_model_name_or_path", "hidden_size", "num_layers") if key not in record]
    if missing:
        raise ModelLoadError(f"{path}: missing {', '.join(missing)}")
    return record


def _adapter_config(record: dict[str, Any], path: Path) -> AdapterConfig:
    fields = {key: value for key, value in record.items() if key in AdapterConfig.model_fields}
    unknown = sorted(set(record) - set(fields) - {"base_model_name_or_path", "hidden_size", "num_layers",
                                                    "format_version"})
    if unknown:
        raise ModelLoadError(f"{path}: unknown key(s) {', '.join(unknown)}")
    try:
        return AdapterConfig(**fields)
    except ValueError as error:
        raise ModelLoadError(f"{path}: invalid adapter config: {error}") from None


def _check_base_matches(model: PreTrainedModel, record: dict[str, Any], path: Path) -> None:
    """The saved hidden size and layer count equal the base model's."""
    actual = {"hidden_size": _hidden_size(model), "num_layers": len(_decoder_layers(model))}
    for key, value in actual.items():
        if record[key] != value:
            raise ModelLoadError(f"{path}: {key} is {record[key]} but the base model has {value}; load the adapter "
                                 f"onto the model it was trained from ({record['base_model_name_or_path']})")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: not found; the adapter folder is incomplete") from None
    except (SafetensorError, OSError) as error:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({error})") from None


def _copy_weights_strictly(model: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Copy ``weights`` into the adapters; any missing, unexpected or misshapen key raises."""
    targets = {f"{prefix}.{name}": tensor for prefix, adapter in _adapters(model).items()
               for name, tensor in adapter.state_dict().items()}
    missing = sorted(set(targets) - set(weights))
    if missing:
        raise ModelLoadError(f"{path}: missing adapter weight {missing[0]}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(weights) - set(targets))
    if unexpected:
        raise ModelLoadError(f"{path}: unexpected key {unexpected[0]}"
                             + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                             + "; it does not match this adapter config")
    for name, target in targets.items():
        if weights[name].shape != target.shape:
            raise ModelLoadError(f"{path}: {name} has shape {tuple(weights[name].shape)} but the adapter config "
                                 f"({BOTTLENECK_CONFIG}) expects {tuple(target.shape)}")
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(weights[name])


def load_bottleneck(base_model: PreTrainedModel, directory: Path) -> PreTrainedModel:
    """Add the adapters saved in ``directory`` to ``base_model`` and load their weights; eval mode."""
    directory = Path(directory)
    config_path = directory / BOTTLENECK_CONFIG
    record = read_bottleneck_config(directory)
    config = _adapter_config(record, config_path)
    _check_base_matches(base_model, record, config_path)
    weights = _read_weights(directory / BOTTLENECK_WEIGHTS)
    model = add_bottleneck_adapters(base_model, config)
    try:
        _copy_weights_strictly(model, weights, directory / BOTTLENECK_WEIGHTS)
    except ModelLoadError:
        _remove_adapters(model)
        raise
    return model.eval()
