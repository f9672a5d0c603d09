"""Peak memory per device, time and cost of a training config before it runs: `tunesmith estimate`.

Pure functions over the typed config and the model's ``config.json`` (read through
``models.load.resolve_model_source``: no weights are loaded). The memory is an account of the
tensors a step keeps alive, path by path, as tunesmith's code makes them (docs/estimate.md lists
each term and the measurements that check it):

- weights (4-bit for QLoRA: half a byte a weight plus its quantization constants; peft keeps the
  embeddings, head and norms of a 4-bit model in fp32), LoRA adapters (fp32), gradients of what
  trains, the optimizer's state;
- activations: what autograd saves per token in each decoder layer (norm inputs, the inputs of the
  linear layers that need them, q/k/v/out of attention, the MLP's intermediates), or with gradient
  checkpointing each layer's input plus one layer recomputed; plus the working gradients of the
  layer in backward;
- logits and loss: one chunk with tunesmith's chunked loss, the full (tokens x vocab) logits without;
- a reference model (DPO, GRPO, PPO, ``kl_to_base``): none for adapter methods (adapters off), a
  frozen copy for full and freeze; generation's KV cache (GRPO, PPO).

The peak is the largest of four moments: the loss (every activation saved, the loss's buffers
live), the bottom of backward (gradients of every layer above), the optimizer step (every gradient
and the optimizer's temporaries) and generation. DDP replicates everything (plus its gradient
buckets); FSDP2 and DeepSpeed ZeRO-3 shard weights, gradients and optimizer state over the devices
and gather the root (embeddings, head) and two decoder layers at a time; ZeRO-2 shards the gradients
and optimizer state and replicates the weights. CPU offload (FSDP's, ZeRO's) is not modelled: the
figures are those without it, an upper bound for GPU memory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tunesmith.config.schema import Config, ModelConfig
from tunesmith.errors import ConfigError
from tunesmith.models.fastpath import FAST_PATH_MODELS

MiB, GiB = 2 ** 20, 2 ** 30
# MLPs of two matrices and a GELU (the rest: gate, up and down with SwiGLU).
PLAIN_MLP_MODELS = frozenset({"gpt2", "gpt_neox", "gptj", "opt", "phi", "falcon", "bloom", "starcoder2",
                              "gpt_bigcode", "codegen"})
LORA_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
              "down": "down_proj"}
# Bytes of tensors outside the account that a run still holds: on a GPU, the cuBLAS workspaces and
# small buffers in torch.cuda.max_memory_allocated; on CPU, what a run's peak RSS adds over a process
# that has only imported tunesmith (tokenizer, datasets, allocator pools, kernels' code pages),
# measured with the tiny model (tests/test_estimate.py prints it). The one calibrated constant.
RUNTIME_BYTES = {"cuda": 256 * MiB, "cpu": 48 * MiB}
# Where DeepSpeed is installed, accelerate and transformers import it in every run (their unwrap_model looks
# for its engine): host memory only. Calibrated like RUNTIME_BYTES, on the tiny LoRA run: its increase is
# 167-170 MiB with deepspeed 0.19 installed against 133 without (`import deepspeed` alone adds 59 MiB to a
# bare process, part of it what the run loads anyway).
DEEPSPEED_IMPORT_BYTES = 36 * MiB


def runtime_bytes(device: str) -> float:
    """RUNTIME_BYTES of ``device``, with DeepSpeed's import on CPU where it is installed."""
    extra = DEEPSPEED_IMPORT_BYTES if device == "cpu" and importlib.util.find_spec("deepspeed") else 0
    return float(RUNTIME_BYTES[device] + extra)
START_POINT_LIMIT = 2 * GiB  # train.loop keeps the run's start in host memory up to this many trainable bytes
FIT_SHARE = 0.92  # "fits" leaves 8% of the device for the CUDA context and the allocator's fragmentation
CHUNK = 1024  # tokens per chunk of the chunked loss without Liger (losses.chunked)


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder-only transformer that its memory and FLOPs depend on."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def gated(self) -> bool:
        return self.model_type not in PLAIN_MLP_MODELS

    @property
    def fast_path(self) -> bool:
        return self.model_type in FAST_PATH_MODELS

    def linears(self) -> list[tuple[str, int, int, str]]:
        """(name, input width, output width, input group) of each linear layer of one decoder layer;
        layers of one group read the same tensor."""
        d, q, kv, inter = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        mlp = [("gate", d, inter, "mlp_in")] if self.gated else []
        return [("q", d, q, "attn_in"), ("k", d, kv, "attn_in"), ("v", d, kv, "attn_in"), ("o", q, d, "attn_out"),
                *mlp, ("up", d, inter, "mlp_in"), ("down", inter, d, "mlp_out")]

    @property
    def layer_linear_params(self) -> int:
        return sum(i * o for _, i, o, _ in self.linears())

    @property
    def layer_params(self) -> int:
        return self.layer_linear_params + 2 * self.hidden  # two norms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.embedding_params + self.head_params + self.layers * self.layer_params + self.hidden


def read_architecture(tree: dict[str, Any], source: str = "config.json") -> Architecture:
    """An ``Architecture`` from a Hugging Face config.json (its ``text_config`` for multimodal models).

    >>> a = read_architecture({"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    ...     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    ...     "tie_word_embeddings": True})
    >>> (a.head_dim, a.kv_dim, round(a.params / 1e6, 1))
    (64, 192, 134.5)
    """
    tree = tree.get("text_config") or tree

    def first(*keys: str, default: Any = None) -> Any:
        for key in keys:
            if tree.get(key) is not None:
                return tree[key]
        if default is None:
            raise ConfigError([f"{source}: no {' or '.join(keys)}; the estimate needs the model's architecture "
                               "(a Hugging Face config.json of a decoder-only model)"])
        return default

    hidden = int(first("hidden_size", "n_embd", "d_model"))
    heads = int(first("num_attention_heads", "n_head"))
    return Architecture(
        model_type=str(tree.get("model_type", "unknown")), hidden=hidden,
        intermediate=int(first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
        layers=int(first("num_hidden_layers", "n_layer", "num_layers")), heads=heads,
        kv_heads=int(first("num_key_value_heads", "n_head_kv", default=heads)),
        head_dim=int(first("head_dim", default=hidden // heads)), vocab=int(first("vocab_size")),
        tied=bool(tree.get("tie_word_embeddings", True)))


def load_architecture(model: ModelConfig) -> Architecture:
    """The architecture of ``model.name_or_path`` from its config.json (the embedded model, a folder, a
    GGUF file's metadata or a hub id), without loading weights."""
    from tunesmith.models.load import resolve_model_source

    folder, gguf = resolve_model_source(model)
    path = Path(folder) / "config.json"
    if gguf is None and path.is_file():
        return read_architecture(json.loads(path.read_text(encoding="utf-8")), str(path))
    from transformers import AutoConfig

    kwargs = {"gguf_file": gguf} if gguf else {}
    tree = AutoConfig.from_pretrained(folder, trust_remote_code=model.trust_remote_code, **kwargs).to_dict()
    return read_architecture(tree, f"{folder}/{gguf}" if gguf else folder)


Strategy = Literal["single", "ddp", "fsdp", "zero2", "zero3"]  # zero2, zero3: DeepSpeed ZeRO's stages
WEIGHTS_SHARDED = ("fsdp", "zero3")
STATE_SHARDED = ("fsdp", "zero2", "zero3")  # gradients and optimizer state


def _shards(plan: Plan) -> tuple[int, int]:
    """(what the weights are divided by, what the gradients and optimizer state are divided by)."""
    return (plan.gpus if plan.strategy in WEIGHTS_SHARDED else 1,
            plan.gpus if plan.strategy in STATE_SHARDED else 1)


def strategy_of(config: Config) -> Strategy | None:
    """The strategy ``training.distributed`` names (None for auto)."""
    chosen = config.training.distributed
    if chosen == "deepspeed":
        return "zero3" if config.training.deepspeed.stage == 3 else "zero2"
    return None if chosen == "auto" else chosen
Loss = Literal["chunked", "liger", "logits", "transformers", "labels", "score"]


@dataclass(frozen=True)
class Plan:
    """What one device does in a step: the config's choices, the strategy and the rows of the largest
    micro-batch (default: every row at ``seq_len``, the worst case)."""

    task: str
    method: str
    device: Literal["cuda", "cpu"]
    gpus: int
    strategy: Strategy
    micro_batch: int  # rows per micro-batch per device, as training.batch_size counts them
    grad_accum: int
    seq_len: int
    checkpointing: bool
    param_bytes: int  # the model's dtype: 2 (bf16/fp16) or 4
    autocast: bool  # bf16/fp16 autocast (mixed_precision)
    optimizer: str
    padding_free: bool
    loss: Loss
    liger: bool
    fused_lora: bool
    lora_r: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = tuple(LORA_NAMES)
    double_quant: bool = True
    trained_layers: int | None = None  # freeze: the top N decoder layers train (None: all)
    trains_embeddings: bool = False
    trains_head: bool = False
    reference: Literal["none", "adapters-off", "copy", "precomputed"] = "none"
    rows_per_unit: int = 1  # rows a batch_size unit stands for: 2 for pairs, group_size for GRPO
    prompt_tokens: int = 0  # GRPO/PPO: prompt length; seq_len - prompt_tokens are generated
    generation_rows: int = 0
    rows: tuple[int, ...] | None = None  # the peak micro-batch's row lengths (measured cases)
    label_tokens: int | None = None  # tokens that carry a loss (default: every token)
    mean_row_tokens: float | None = None  # for time (default: seq_len)
    snapshot: bool = False  # training.divergence rolls back: the run's start is kept in host memory

    @property
    def row_lengths(self) -> tuple[int, ...]:
        return self.rows if self.rows is not None else (self.seq_len,) * (self.micro_batch * self.rows_per_unit)

    @property
    def tokens(self) -> int:
        """Tokens of the micro-batch as the model sees them: packed, or padded to the longest row."""
        rows = self.row_lengths
        return sum(rows) if self.padding_free else len(rows) * max(rows)

    @property
    def labels(self) -> int:
        return self.label_tokens if self.label_tokens is not None else sum(self.row_lengths)

    @property
    def adapters(self) -> bool:
        return self.method in ("lora", "dora", "qlora")


def _lora_targets(targets: list[str] | str) -> tuple[str, ...]:
    if targets == "all-linear":
        return tuple(LORA_NAMES)
    return tuple(short for short, name in LORA_NAMES.items() if any(t.split(".")[-1] == name for t in targets))


def plan_from_config(config: Config, arch: Architecture, gpus: int = 1, strategy: Strategy = "ddp",
                     device: Literal["cuda", "cpu"] | None = None) -> Plan:
    """The plan of ``config`` on ``gpus`` devices (``strategy`` applies when there are several)."""
    training, method = config.training, config.method
    device = device or ("cpu" if config.model.device == "cpu" else "cuda")
    dtype = config.model.dtype if config.model.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    autocast = (training.mixed_precision in ("bf16", "fp16")
                or (training.mixed_precision == "auto" and device == "cuda"))
    virtual = method.type in ("prefix", "prompt")
    fast = arch.fast_path and not virtual
    kl = config.regularization.kl_to_base if config.task in ("sft", "pretrain") else 0.0
    rows, seq_len = training.batch_size, config.data.max_seq_len
    if isinstance(training.batch_tokens, int):  # whole rows packed up to that many tokens
        rows, seq_len = tokens_as_rows(training.batch_tokens, seq_len)
    plan = Plan(task=config.task, method=method.type, device=device, gpus=gpus,
                strategy=strategy if gpus > 1 else "single", micro_batch=rows,
                grad_accum=training.grad_accum, seq_len=seq_len,
                checkpointing=training.gradient_checkpointing, param_bytes=4 if dtype == "float32" else 2,
                autocast=autocast, optimizer=training.optimizer, padding_free=fast and training.padding_free,
                loss="chunked", liger=fast and training.liger and device == "cuda",
                fused_lora=(method.type == "lora" and method.lora.dropout == 0 and training.fused_lora != "off"),
                lora_r=method.lora.r, lora_dropout=method.lora.dropout,
                lora_targets=_lora_targets(method.lora.target_modules),
                double_quant=method.quantization.double_quant,
                trained_layers=method.freeze.last_n_layers if method.type == "freeze" and not (
                    method.freeze.unfreeze_every or method.freeze.pattern) else None,
                trains_embeddings=method.type == "full" or (method.type == "freeze" and method.freeze.train_embeddings),
                trains_head=method.type == "full" or (method.type == "freeze" and method.freeze.train_lm_head),
                snapshot=training.divergence.policy != "warn")
    return dataclasses.replace(plan, loss=_loss_path(config, plan, fast and training.chunked_loss and not kl),
                               **_task_fields(config, plan))


def tokens_as_rows(tokens: int, max_seq_len: int) -> tuple[int, int]:
    """A micro-batch of ``tokens`` packed tokens as (rows, tokens per row) of the plan: rows of
    ``max_seq_len`` (the worst case for per-row attention), or one row of them all.

    >>> tokens_as_rows(8192, 2048), tokens_as_rows(1000, 2048)
    ((4, 2048), (1, 1000))
    """
    return (tokens // max_seq_len, max_seq_len) if tokens >= max_seq_len else (1, tokens)


BATCH_TOKEN_CHOICES = tuple(2 ** k for k in range(10, 19))  # 1,024 to 262,144 tokens per micro-batch


def fitting_batch_tokens(arch: Architecture, plan: Plan, max_seq_len: int, device_memory: float) -> int | None:
    """The most tokens per micro-batch (of ``BATCH_TOKEN_CHOICES``) whose step fits ``FIT_SHARE`` of
    ``device_memory``; None when not even the fewest does."""
    fitting = None
    for tokens in BATCH_TOKEN_CHOICES:
        rows, seq_len = tokens_as_rows(tokens, max_seq_len)
        if estimate_memory(arch, dataclasses.replace(plan, micro_batch=rows, seq_len=seq_len)).peak \
                > FIT_SHARE * device_memory:
            break
        fitting = tokens
    return fitting


def _loss_path(config: Config, plan: Plan, chunked: bool) -> Loss:
    if config.task == "reward":
        return "score"
    if config.task in ("dpo", "grpo", "ppo", "online_dpo"):
        return "labels" if chunked else "logits"
    if not chunked:
        return "logits"
    return "liger" if plan.liger else "chunked"


def _task_fields(config: Config, plan: Plan) -> dict[str, Any]:
    """The reference model and the rows of each task's micro-batch."""
    copy_or_off = "adapters-off" if plan.method not in ("full", "freeze") else "copy"
    if config.task == "dpo":
        preference = config.preference
        reference = ("none" if not preference.needs_reference else "precomputed" if preference.precompute_reference
                     else copy_or_off)
        return {"reference": reference, "rows_per_unit": 2}
    if config.task == "reward":
        return {"rows_per_unit": 2}
    if config.task == "grpo":
        section = config.grpo
        rows = plan.micro_batch * section.group_size  # the loss is on the completions only
        return {"reference": copy_or_off if section.beta > 0 else "none", "rows_per_unit": section.group_size,
                "prompt_tokens": max(plan.seq_len - section.max_new_tokens, 1), "generation_rows": rows,
                "label_tokens": rows * section.max_new_tokens}
    if config.task == "ppo":
        section = config.ppo
        rows = math.ceil(plan.micro_batch / section.minibatches)  # one minibatch of rollouts per step
        return {"reference": copy_or_off if section.kl_coef > 0 else "none", "micro_batch": rows,
                "prompt_tokens": max(plan.seq_len - section.max_new_tokens, 1), "generation_rows": plan.micro_batch,
                "label_tokens": rows * section.max_new_tokens}
    if config.task == "online_dpo":  # two sampled replies per prompt: a pair, the loss on the replies only
        section = config.online_dpo
        rows = plan.micro_batch * 2
        return {"reference": copy_or_off, "rows_per_unit": 2,
                "prompt_tokens": max(plan.seq_len - section.max_new_tokens, 1), "generation_rows": rows,
                "label_tokens": rows * section.max_new_tokens}
    kl = config.regularization.kl_to_base
    return {"reference": copy_or_off if kl > 0 else "none"}


# ---- the parameters: what is stored, what trains ----


def adapter_params(arch: Architecture, plan: Plan) -> int:
    """LoRA's A and B matrices over the targeted linear layers (DoRA adds a magnitude vector each)."""
    if not plan.adapters:
        return 0
    per_layer = sum(plan.lora_r * (i + o) + (o if plan.method == "dora" else 0)
                    for name, i, o, _ in arch.linears() if name in plan.lora_targets)
    return per_layer * arch.layers


def trainable_layer_params(arch: Architecture, plan: Plan) -> float:
    """Trainable parameters of one (trained) decoder layer."""
    if plan.adapters:
        return adapter_params(arch, plan) / arch.layers
    return arch.layer_params if plan.method in ("full", "freeze") else 0.0


def trained_layers(arch: Architecture, plan: Plan) -> int:
    """Decoder layers that keep activations: all, except under freeze (only the top N)."""
    if plan.method == "freeze" and plan.trained_layers is not None:
        return min(arch.layers, plan.trained_layers)
    return arch.layers


def trainable_params(arch: Architecture, plan: Plan) -> int:
    if plan.adapters:
        return adapter_params(arch, plan)
    if plan.method == "full":
        return arch.params
    if plan.method == "freeze":
        outer = arch.embedding_params * plan.trains_embeddings + (
            (arch.head_params or arch.embedding_params) * plan.trains_head)
        return int(trained_layers(arch, plan) * arch.layer_params + outer)
    return 0  # prefix, prompt, ia3, adapter: small; not modelled


def weight_bytes(arch: Architecture, plan: Plan) -> tuple[float, float]:
    """(the model's weights, the 4-bit quantization constants) in bytes. 4-bit (nf4/fp4): half a byte a
    weight, an fp32 absmax per block of 64 (double quant: an 8-bit absmax per block and an fp32 one per
    256 blocks); peft's k-bit preparation keeps the rest (embeddings, head, norms) in fp32."""
    if plan.method != "qlora":
        return arch.params * plan.param_bytes, 0.0
    quantized = arch.layers * arch.layer_linear_params
    constants = quantized * ((1 / 64 + 4 / (64 * 256)) if plan.double_quant else 4 / 64)
    return quantized * 0.5 + (arch.params - quantized) * 4, constants


def optimizer_state_bytes(trainable: float, state_bytes: int, optimizer: str) -> float:
    """AdamW: two moments in the parameters' dtype (8-bit: one byte each); SGD without momentum: none."""
    return {"sgd": 0.0, "adamw_8bit": 2.0 * trainable}.get(optimizer, 2.0 * state_bytes * trainable)


def optimizer_temporary_bytes(arch: Architecture, plan: Plan, trainable: float, state_bytes: int) -> float:
    """Scratch of the optimizer step: torch's default foreach AdamW on a GPU (``adamw_foreach``: what plain
    transformers + peft runs) makes one copy of the second moment; the per-tensor loop (CPU) two copies of
    the largest tensor; fused AdamW (adamw_fused, and adamw on a GPU, which tunesmith runs fused:
    train.optim.fused_adamw) and 8-bit AdamW about none."""
    if plan.optimizer not in ("adamw", "adamw_foreach"):
        return 0.0
    if plan.device == "cuda":
        return trainable * state_bytes if plan.optimizer == "adamw_foreach" else 0.0
    largest = arch.embedding_params if plan.trains_embeddings or plan.trains_head else (
        max(i * o for _, i, o, _ in arch.linears()) if plan.method in ("full", "freeze")
        else max(plan.lora_r * max(i, o) for _, i, o, _ in arch.linears()))
    return 2.0 * largest * state_bytes


# ---- activations: bytes autograd keeps per token ----


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element: the residual stream (``hidden``), what a matmul computes in (``compute``),
    what the linear layers return (``linear``) and what attention keeps (``attention``)."""

    hidden: int
    compute: int
    linear: int
    attention: int


def dtypes(plan: Plan) -> Dtypes:
    """peft's k-bit preparation puts the embeddings in fp32, so a QLoRA model's residual stream is fp32
    and bitsandbytes casts each 4-bit layer's output back to it; autocast computes matmuls in bf16."""
    hidden = 4 if plan.method == "qlora" else plan.param_bytes
    compute = 2 if plan.autocast else hidden
    linear = 4 if plan.method == "qlora" else compute
    return Dtypes(hidden, compute, linear, 2 if plan.autocast else linear)


def attention_kernel(arch: Architecture, plan: Plan) -> str:
    """Which kernel runs attention: ``flash`` (CUDA, half precision, all packed rows in one varlen call),
    ``sdpa`` (a padded batch with its mask: keys and values repeated to every head), ``math`` (CUDA
    fp32 with grouped-query heads: SDPA's only kernel for it, which keeps the scores), ``efficient``
    or ``cpu`` (SDPA's flash kernel for CPU)."""
    if plan.device == "cpu":
        return "cpu"
    if not plan.padding_free:
        return "sdpa"
    if dtypes(plan).attention == 2:
        return "flash"
    return "math" if arch.heads != arch.kv_heads else "efficient"


def _linear_input_bytes(arch: Architecture, plan: Plan, trains: bool) -> float:
    """Inputs the linear layers of one decoder layer keep, per token: once per group where a layer
    needs its input as it is, per layer where it needs a copy (a cast, a dropout)."""
    kinds = dtypes(plan)
    group_dtype = {"attn_in": kinds.hidden, "attn_out": kinds.attention, "mlp_in": kinds.hidden,
                   "mlp_out": kinds.linear}
    if attention_kernel(arch, plan) == "flash":
        group_dtype["attn_out"] = 0  # o_proj reads the kernel's own output (counted with attention)
    shared: dict[str, float] = {}
    private = 0.0
    for name, width, _, group in arch.linears():
        x = group_dtype[group]
        lora = plan.adapters and name in plan.lora_targets
        if trains or (lora and plan.fused_lora):  # its weight gradient (or fused LoRA's) needs the input
            if x == kinds.compute or x == 0:
                shared[group] = x * width
            else:
                private += kinds.compute * width  # autocast's bf16 copy, one per layer
        elif lora:  # peft: x -> fp32 (the adapters' dtype) -> dropout -> lora_A
            if plan.lora_dropout > 0:
                mask = 4 if plan.device == "cpu" else 1  # CPU dropout keeps a float noise tensor
                private += (mask + (2 if plan.autocast else 4)) * width
            elif plan.autocast:
                private += 2 * width
            elif x != 4:
                private += 4 * width
            else:
                shared[group] = x * width
    return sum(shared.values()) + private


def _norm_bytes(arch: Architecture, plan: Plan, trains: bool) -> float:
    """One RMSNorm, per token: Liger's keeps its input; transformers' an fp32 copy of it (and its
    normalized output where the norm's weight trains)."""
    kinds = dtypes(plan)
    if plan.liger:
        return kinds.hidden * arch.hidden
    return 4 * arch.hidden + (kinds.hidden * arch.hidden if trains else 0)


def layer_activation_bytes(arch: Architecture, plan: Plan, trains: bool = True) -> float:
    """Bytes one decoder layer keeps for backward per token (no checkpointing): ``trains`` when its
    weights train (full, freeze's top layers), else only the gradient flows through it."""
    kinds = dtypes(plan)
    kernel = attention_kernel(arch, plan)
    kv = arch.q_dim if kernel == "sdpa" and arch.heads != arch.kv_heads else arch.kv_dim
    attention = kinds.attention * (2 * arch.q_dim + 2 * kv) + 4 * arch.heads  # q, k, v, out, log-sum-exp
    if arch.gated:
        mlp = (2 if plan.liger else 3) * kinds.linear * arch.intermediate
    else:
        mlp = kinds.linear * arch.intermediate
    return 2 * _norm_bytes(arch, plan, trains) + _linear_input_bytes(arch, plan, trains) + attention + mlp


def attention_score_bytes(arch: Architecture, plan: Plan) -> float:
    """Bytes per layer per squared row length that a kernel without tiling keeps (its softmax)."""
    return dtypes(plan).attention * arch.heads if attention_kernel(arch, plan) == "math" else 0.0


def backward_working_bytes(arch: Architecture, plan: Plan) -> float:
    """Per token, the gradients alive while one layer is differentiated: the MLP's (three of
    intermediate width with transformers' SwiGLU, one with Liger's in-place kernel) and two of the
    residual stream."""
    kinds = dtypes(plan)
    width = (1 if plan.liger or not arch.gated else 3) * arch.intermediate
    return kinds.linear * width + 2 * kinds.hidden * arch.hidden


@dataclass(frozen=True)
class Activations:
    """Bytes of a micro-batch's activations: every layer's saved tensors (``saved``), the layer
    differentiated at the bottom of backward (``bottom``) and the working gradients (``working``)."""

    saved: float
    recomputed: float
    bottom: float
    working: float
    without_checkpointing: float
    with_checkpointing: float


def activation_bytes(arch: Architecture, plan: Plan) -> Activations:
    tokens, kinds = plan.tokens, dtypes(plan)
    squares = sum(r * r for r in plan.row_lengths) if plan.padding_free else len(plan.row_lengths) * max(
        plan.row_lengths) ** 2
    trains = plan.method in ("full", "freeze")
    layer = layer_activation_bytes(arch, plan, trains) * tokens + attention_score_bytes(arch, plan) * squares
    grad_only = (arch.layers if plan.method != "freeze" or plan.trains_embeddings else trained_layers(arch, plan))
    outer = _norm_bytes(arch, plan, plan.method == "full") * tokens  # the final norm
    full = layer * grad_only + outer
    checkpointed = kinds.hidden * arch.hidden * tokens * grad_only + outer
    working = backward_working_bytes(arch, plan) * tokens
    if plan.checkpointing:
        return Activations(checkpointed, layer, kinds.hidden * arch.hidden * tokens + layer, working, full,
                           checkpointed + layer)
    return Activations(full, 0.0, layer, working, full, checkpointed + layer)


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(value, 1))))


def loss_bytes(arch: Architecture, plan: Plan) -> tuple[float, float]:
    """(the logits and loss's peak in bytes, the head's gradient made in the forward). Chunked loss:
    one chunk of 1,024 label tokens' fp32 logits and two temporaries of their size; Liger: a chunk of
    about as many logits as the hidden states hold; full logits: the logits, the fp32 log-softmax that
    cross-entropy keeps and two gradient buffers; task losses on log-probs (DPO, GRPO, PPO): the fp32
    log-softmax at the label positions, its gradients, and the reference's pass beside it."""
    vocab, hidden, tokens, labels = arch.vocab, arch.hidden, plan.tokens, plan.labels
    kinds = dtypes(plan)
    logits = kinds.compute if plan.method != "qlora" else kinds.linear  # the head's output dtype
    head_trains = plan.trains_head or (arch.tied and plan.trains_embeddings)
    head_grad = vocab * hidden * 4 if head_trains else 0.0
    if plan.loss == "chunked":
        chunk = min(labels, CHUNK)
        return 12 * chunk * vocab + 2 * labels * hidden * kinds.hidden, head_grad
    if plan.loss == "liger":
        chunk = _next_power_of_two(math.ceil(labels / math.ceil(vocab / hidden)))
        return chunk * vocab * kinds.hidden + labels * hidden * kinds.hidden, head_grad / 4 * kinds.hidden
    if plan.loss == "score":
        return 0.0, 0.0
    if plan.loss == "transformers":  # transformers' own loss (labels=): fp32 logits, log-softmax and grads
        return 12 * tokens * vocab, 0.0
    if plan.loss == "labels":
        reference = plan.reference in ("adapters-off", "copy")
        return labels * vocab * (4 + logits + 8 if reference else 12), 0.0
    if plan.task in ("dpo", "grpo", "ppo", "online_dpo"):  # full logits, then the label positions'
        return tokens * vocab * logits + labels * vocab * 12, 0.0
    return tokens * vocab * (4 + 2 * logits) + (8 * min(labels, CHUNK) * vocab if logits == 2 else 0), 0.0


# ---- the peak: the largest of the moments of a step ----


@dataclass
class Memory:
    """Per-device bytes by component at the peak moment (they add up to ``peak``), every moment's total,
    and the activations with and without checkpointing."""

    parts: dict[str, float]
    moment: str
    moments: dict[str, float]
    activations_without_checkpointing: float
    activations_with_checkpointing: float

    @property
    def peak(self) -> float:
        return self.moments[self.moment]


def generation_bytes(arch: Architecture, plan: Plan) -> tuple[float, float]:
    """(KV cache, working) of sampling ``generation_rows`` completions to ``seq_len`` tokens: keys and
    values of every layer and position; the prefill's largest layer intermediates and each step's fp32
    logits."""
    if not plan.generation_rows:
        return 0.0, 0.0
    kinds = dtypes(plan)
    cache = plan.generation_rows * plan.seq_len * 2 * arch.layers * arch.kv_dim * kinds.linear
    prefill = plan.generation_rows * plan.prompt_tokens * (3 * kinds.linear * arch.intermediate
                                                          + 4 * kinds.hidden * arch.hidden)
    return cache, prefill + 2 * plan.generation_rows * arch.vocab * 4


def _fixed_parts(arch: Architecture, plan: Plan) -> dict[str, float]:
    """What every moment holds: weights, adapters, optimizer state, reference copy, runtime; sharded
    over the devices under FSDP, which also gathers the root (embeddings, head) and two layers. On CPU
    the run's start (a copy of the trainable weights, for a rollback) is in the same memory."""
    shards, state_shards = _shards(plan)
    weights, constants = weight_bytes(arch, plan)
    trainable, grad = trainable_params(arch, plan), 4 if plan.adapters else plan.param_bytes
    parts = {"weights": weights / shards, "4-bit constants": constants / shards,
             "LoRA adapters": adapter_params(arch, plan) * 4 / shards,
             "optimizer state": optimizer_state_bytes(trainable, grad, plan.optimizer) / state_shards,
             "reference model": (weights + constants) / shards if plan.reference == "copy" else 0.0,
             "runtime": runtime_bytes(plan.device)}
    if plan.device == "cpu" and plan.snapshot and plan.strategy in ("single", "ddp") \
            and trainable * grad <= START_POINT_LIMIT:
        parts["rollback snapshot"] = trainable * grad
    if plan.strategy in WEIGHTS_SHARDED:
        layer = weights * (arch.layers * arch.layer_params / arch.params) / arch.layers
        root = (arch.embedding_params + arch.head_params) * plan.param_bytes
        parts["FSDP gathered"] = root + 2 * layer + trainable_layer_params(arch, plan) * grad
    return parts


def estimate_memory(arch: Architecture, plan: Plan) -> Memory:
    """Peak bytes per device of a training step of ``plan``."""
    fixed = _fixed_parts(arch, plan)
    _, shards = _shards(plan)  # gradients
    buckets = plan.strategy == "ddp"  # DDP's buckets: a second copy of the gradients
    trainable, grad = trainable_params(arch, plan), 4 if plan.adapters else plan.param_bytes
    acts = activation_bytes(arch, plan)
    logits, head_grad = loss_bytes(arch, plan)
    layer_grad = trainable_layer_params(arch, plan) * grad
    below = (trained_layers(arch, plan) - 1) * layer_grad / shards + head_grad / shards
    all_grads = trainable * grad / shards
    cache, generating = generation_bytes(arch, plan)
    temporaries = optimizer_temporary_bytes(arch, plan, trainable, grad) / shards
    moments = {
        "loss": {"activations": acts.saved, "logits and loss": logits, "gradients": head_grad / shards},
        "backward (top)": {"activations": acts.saved + acts.recomputed + acts.working,
                           "gradients": head_grad / shards},
        "backward (bottom)": {"activations": acts.bottom + acts.working, "gradients": below},
        "optimizer step": {"gradients": all_grads, "optimizer scratch": temporaries},
    }
    if plan.generation_rows:
        moments["generation"] = {"generation KV cache": cache, "activations": generating}
    for parts in moments.values():
        if buckets and parts.get("gradients"):
            parts["DDP buckets"] = parts["gradients"]
        parts.update(fixed)
    totals = {name: sum(parts.values()) for name, parts in moments.items()}
    moment = max(totals, key=totals.__getitem__)
    return Memory(moments[moment], moment, totals, acts.without_checkpointing, acts.with_checkpointing)


# ---- time and cost ----

PEAK_TFLOPS = 989.0  # dense bf16 of an H100/H200 (tunesmith.train.mfu.PEAK_TFLOPS); --peak-tflops for others
HBM_TBPS = 3.35  # H100 SXM memory bandwidth: generation reads every weight once per new token
MFU_FULL_AT = 25e6  # tokens x hidden per micro-batch from which the GPU is busy (fitted to the bench rows)
MFU_CEILING = 0.55  # hardware FLOPs utilisation of the fast path at large micro-batches (bench rows: 0.44-0.61)
SLOW_PATH_SHARE = 0.25  # QLoRA's dequantisation, or the fast path off: a quarter of that (bench rows: 0.24-0.26)


def assumed_mfu(arch: Architecture, plan: Plan) -> float:
    """The hardware FLOPs utilisation assumed for ``plan`` (docs/estimate.md compares it with the
    measured H200 rows): 0.55 from 25M tokens x hidden per micro-batch, proportionally less below (a
    small micro-batch leaves the GPU idle), a quarter of that for QLoRA or with the fast path off."""
    work = plan.micro_batch * plan.rows_per_unit * (plan.mean_row_tokens or plan.seq_len) * arch.hidden
    share = SLOW_PATH_SHARE if plan.method == "qlora" or not plan.padding_free else 1.0
    return MFU_CEILING * min(1.0, work / MFU_FULL_AT) * share


@dataclass
class Timing:
    tokens_per_step: float  # all devices, one optimizer step
    flops_per_token: float  # model FLOPs: 4N + 2T + 6·L·s·d
    work_per_token: float  # what the GPU runs: plus the recomputation and the reference's forward
    mfu: float
    seconds_per_step: float
    steps: int
    seconds: float
    gpu_hours: float
    cost: float | None


def estimate_time(arch: Architecture, plan: Plan, steps: int, peak_tflops: float = PEAK_TFLOPS,
                  mfu: float | None = None, price_per_gpu_hour: float | None = None,
                  rollouts_every: int = 1) -> Timing:
    """Time of ``steps`` optimizer steps from FLOPs at an assumed utilisation (``mfu`` overrides
    ``assumed_mfu``); generation (GRPO, PPO, every ``rollouts_every`` steps) is bounded by memory
    bandwidth."""
    mean = plan.mean_row_tokens or plan.seq_len
    rows = plan.micro_batch * plan.rows_per_unit
    padded = plan.tokens if plan.rows is not None else rows * plan.seq_len  # a padded row costs the longest's
    computed = (rows * mean if plan.padding_free else padded) * plan.grad_accum  # per device
    params, trainable = arch.params, trainable_params(arch, plan)
    flops = 4 * params + 2 * trainable + 6 * arch.layers * mean * arch.hidden
    work = flops + 2 * params * (plan.checkpointing + (plan.reference in ("adapters-off", "copy")))
    utilisation = mfu or assumed_mfu(arch, plan)
    seconds = computed * work / (peak_tflops * 1e12 * utilisation)
    if plan.generation_rows:
        weights, constants = weight_bytes(arch, plan)
        decode = (plan.seq_len - plan.prompt_tokens) * (weights + constants) / (HBM_TBPS * 1e12 * 0.6)
        seconds += decode * plan.grad_accum / rollouts_every
    total = seconds * steps
    hours = total * plan.gpus / 3600
    return Timing(rows * mean * plan.grad_accum * plan.gpus, flops, work, utilisation, seconds, steps, total,
                  hours, hours * price_per_gpu_hour if price_per_gpu_hour is not None else None)


# ---- the config as written, the alternatives that fit, a recommendation ----


def count_steps(config: Config, gpus: int, batch_tokens: int | None = None, mean_row_tokens: float | None = None
                ) -> int:
    """Optimizer steps of the run: ``training.max_steps``, else epochs over the training rows (counted,
    not tokenized) at the global batch (PPO: times its updates per batch of rollouts). With ``batch_tokens``
    a micro-batch holds budget / ``mean_row_tokens`` rows (default: rows of data.max_seq_len)."""
    from tunesmith.data.readers import read_rows

    if config.training.max_steps:
        return config.training.max_steps
    rows = sum(sum(1 for _ in read_rows(dataset.path)) for dataset in config.data.train)
    if not config.data.eval:
        rows -= int(rows * config.data.eval_fraction)
    per_micro = config.training.batch_size
    if batch_tokens:
        per_micro = max(1, int(batch_tokens // (mean_row_tokens or config.data.max_seq_len)))
    batch = per_micro * config.training.grad_accum * gpus
    steps = math.ceil(config.training.epochs * rows / batch)
    return steps * (config.ppo.steps_per_batch if config.task == "ppo" else 1)


@dataclass
class Option:
    plan: Plan
    memory: Memory
    timing: Timing
    fits: bool


@dataclass
class Report:
    arch: Architecture
    written: Option
    options: list[Option]
    recommended: Option | None
    gpu_memory: float
    assumptions: list[str]
    notes: list[str]


def auto_strategy(arch: Architecture, plan: Plan, gpu_memory: float) -> Strategy:
    """``auto``: DDP for adapter methods; FSDP2 for full fine-tuning when its DDP plan does not fit."""
    if plan.gpus == 1:
        return "single"
    ddp = dataclasses.replace(plan, strategy="ddp")
    if plan.adapters or estimate_memory(arch, ddp).peak <= FIT_SHARE * gpu_memory:
        return "ddp"
    return "fsdp"


def variants(plan: Plan) -> list[Plan]:
    """The plan with the same global batch under each method (its own; LoRA and QLoRA as cheaper ones),
    strategy, checkpointing and micro-batch (halved down to 1, accumulation raised to match)."""
    methods = [plan.method] + [m for m in ("lora", "qlora") if m != plan.method and plan.method in (
        "full", "freeze", "lora", "dora")]
    strategies = ["single"] if plan.gpus == 1 else ["ddp", "fsdp"] + (
        ["zero2", "zero3"] if plan.strategy in ("zero2", "zero3") else [])  # DeepSpeed's where the config asks for it
    batches, size = [], plan.micro_batch
    while size >= 1:
        batches.append(size)
        size //= 2
    found = []
    for method in methods:
        for strategy in strategies:
            for checkpointing in ((False, True) if plan.method != "prefix" else (False,)):
                for size in batches:
                    accum = math.ceil(plan.micro_batch * plan.grad_accum / size)
                    found.append(dataclasses.replace(
                        plan, method=method, strategy=strategy, checkpointing=checkpointing, micro_batch=size,
                        grad_accum=accum, fused_lora=plan.fused_lora if method == plan.method else (
                            method == "lora" and plan.lora_dropout == 0), reference=_reference_for(plan, method),
                        trained_layers=plan.trained_layers if method == plan.method else None,
                        trains_embeddings=plan.trains_embeddings and method == plan.method,
                        trains_head=plan.trains_head and method == plan.method))
    return found


def _reference_for(plan: Plan, method: str) -> str:
    if plan.reference in ("none", "precomputed"):
        return plan.reference
    return "copy" if method in ("full", "freeze") else "adapters-off"


def estimate(arch: Architecture, plan: Plan, steps: int, gpu_memory: float, peak_tflops: float = PEAK_TFLOPS,
             mfu: float | None = None, price_per_gpu_hour: float | None = None, rollouts_every: int = 1) -> Report:
    """The plan as written, every variant's estimate (fitting ones first, fastest first) and the
    recommendation: the fastest variant that fits with the config's method, else with another."""

    def option(candidate: Plan) -> Option:
        memory = estimate_memory(arch, candidate)
        timing = estimate_time(arch, candidate, steps, peak_tflops, mfu, price_per_gpu_hour, rollouts_every)
        return Option(candidate, memory, timing, memory.peak <= FIT_SHARE * gpu_memory)

    written = option(plan)
    options = sorted((option(p) for p in variants(plan)),
                     key=lambda o: (not o.fits, o.plan.method != plan.method, o.timing.seconds,
                                    o.plan.strategy != "ddp", o.memory.peak))
    fitting = [o for o in options if o.fits]
    return Report(arch, written, options, fitting[0] if fitting else None, gpu_memory,
                  assumptions(plan, mfu, peak_tflops), notes(arch, plan, written.memory))


def notes(arch: Architecture, plan: Plan, memory: Memory) -> list[str]:
    """Settings outside the recommendation's four that would change the peak a lot."""
    found = []
    if plan.method == "lora" and plan.lora_dropout > 0 and plan.device == "cuda":
        fused = estimate_memory(arch, dataclasses.replace(plan, lora_dropout=0.0, fused_lora=True)).peak
        if fused < 0.9 * memory.peak:
            found.append(f"method.lora.dropout {plan.lora_dropout:g} keeps peft's LoRA forward (a dropout and an "
                         f"fp32 copy of each adapted layer's input); with 0, fused LoRA: peak "
                         f"{fused / GiB:,.1f} GiB instead of {memory.peak / GiB:,.1f}")
    return found


def assumptions(plan: Plan, mfu: float | None, peak_tflops: float) -> list[str]:
    rows = "every row at data.max_seq_len" + ("" if plan.padding_free else " (padded)")
    labels = "the completions carrying the loss" if plan.generation_rows else "every token carrying a loss"
    return [f"memory: the largest micro-batch has {rows}, {labels} (the worst case); Liger installed on GPUs",
            f"time: rows of {plan.mean_row_tokens or plan.seq_len:,.0f} tokens on average (--row-tokens), "
            f"{peak_tflops:g} TFLOP/s peak per device, utilisation "
            + (f"{mfu:g} (--mfu)" if mfu else f"{MFU_CEILING:g} x min(1, tokens x hidden per micro-batch / "
               f"{MFU_FULL_AT / 1e6:g}M), x {SLOW_PATH_SHARE:g} for QLoRA or without the fast path"),
            "time: FLOPs per token 4N + 2T + 6·L·s·d, plus 2N for checkpointing's recomputation and for a "
            "reference model's forward; communication is taken to overlap with compute",
            f"fits: peak <= {FIT_SHARE:.0%} of the device (the CUDA context and fragmentation are outside it); "
            "DDP keeps a second copy of the gradients in its buckets",
            f"runtime: {runtime_bytes(plan.device) / MiB:.0f} MiB outside the account (the one calibrated "
            "constant, with DeepSpeed's import on CPU where it is installed; docs/estimate.md)"]
