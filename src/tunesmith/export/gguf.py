"""`tunesmith export RUN --to gguf`: our own GGUF writer on the `gguf` package.

Why our own: llama.cpp's converter is a script inside a C++ repository, not a library, and
building llama.cpp to run it is what makes GGUF export fragile elsewhere. The format facts this
writer follows (from the GGUF spec and llama.cpp's conventions, which transformers' GGUF loader
also reads):

- tensor names come from the `gguf` package's own name map (``blk.N.attn_q.weight``, ...);
- for the ``llama`` architecture the q and k projections are stored with each head's rows
  interleaved (GGML's rotary embedding rotates adjacent pairs; transformers rotates halves);
- 1-D tensors (norms, biases) stay float32; 2-D weights take the chosen type; a quantized type
  needs rows divisible by its block size, other tensors fall back to float16;
- a tied LM head is not written (the loader ties it back when ``output.weight`` is absent);
- the tokenizer goes in ``tokenizer.ggml.*``: byte-level BPE as ``gpt2`` (tokens, merges, types),
  with the chat template, special ids and the template's turn-end token as ``eot``.

The file is checked after writing: transformers loads it back (model and tokenizer) and it is
compared with the training-time model before it is moved into place.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tunesmith.config.names import GGUF_QUANTS
from tunesmith.data.tokenize import adds_bos, render, turn_end_token
from tunesmith.export.hf import ExportResult, verify
from tunesmith.export.merge import ExportError, merge_for_export
from tunesmith.models.inference import Target
from tunesmith.targets import resolve_target
from tunesmith.export.ollama import modelfile
from tunesmith.export.parity import PARITY_PROMPTS
from tunesmith.io import atomic_directory

log = logging.getLogger(__name__)

# transformers model_type -> GGUF architecture. Mistral is llama in GGUF (llama.cpp's own convention);
# transformers' loader reads such a file back as a Llama model: the same weights and computation,
# minus a sliding window (which Mistral v0.2 and later do not use).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# Architectures whose q/k rows GGML expects interleaved (llama.cpp permutes only these).
PERMUTED = {"llama"}

QUANTS = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
assert tuple(QUANTS) == GGUF_QUANTS, "config.names.GGUF_QUANTS names the types `export --quant` accepts"

# Pre-tokenizer split patterns -> llama.cpp's names for them (tokenizer.ggml.pre).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclass
class GGUFFile:
    path: Path
    quant: str
    parity: object | None  # ParityReport


def _permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from halves (transformers' rotate_half) to interleaved pairs (GGML).

    >>> w = np.arange(8).reshape(8, 1)  # one head of dimension 8: rows 0-3 first half, 4-7 second
    >>> _permute_rows(w, 1).ravel().tolist()
    [0, 4, 1, 5, 2, 6, 3, 7]
    """
    head_dim = weight.shape[0] // heads
    return (weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _check_supported(model: PreTrainedModel) -> str:
    config = model.config
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ExportError(f"GGUF export supports the {', '.join(sorted(ARCHITECTURES))} families; this model is "
                          f"{config.model_type!r}. Export it with `--to hf` and convert it with llama.cpp's "
                          f"convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ExportError(f"GGUF export: rope scaling {rope_type!r} is not written by this exporter yet "
                          f"(default and linear are); export with `--to hf`")
    return arch


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _write_hparams(writer: gguf.GGUFWriter, model: PreTrainedModel, name: str, file_type: int) -> None:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tensor_type(name: str, array: np.ndarray, wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if array.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if array.shape[-1] % block:
        log.info("%s: %d columns are not a multiple of %s's block of %d; written as f16", name, array.shape[-1],
                 wanted.name, block)
        return gguf.GGMLQuantizationType.F16
    return wanted


def _write_tensors(writer: gguf.GGUFWriter, model: PreTrainedModel, arch: str,
                   wanted: gguf.GGMLQuantizationType) -> None:
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise ExportError(f"GGUF export: no GGUF name for tensor {hf_name!r} of a {config.model_type} model")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if arch in PERMUTED and base.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            heads = config.num_attention_heads if base.endswith("q_proj") else config.num_key_value_heads
            array = _permute_rows(array, heads)
        name = f"{gguf_name}.{suffix}"
        kind = _tensor_type(name, array, wanted)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array)
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)


def _pre_tokenizer_name(spec: dict) -> str:
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    for part in parts:
        if part.get("type") == "Split":
            pattern = part.get("pattern", {}).get("Regex")
            if pattern in PRE_TOKENIZERS:
                return PRE_TOKENIZERS[pattern]
    if [p.get("type") for p in parts] == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    log.warning("GGUF export: unrecognised pre-tokenizer; written as 'default' (llama.cpp may split text "
                "differently from transformers; transformers' loader is checked below)")
    return "default"


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    if not tokenizer.is_fast:
        raise ExportError("GGUF export needs a fast tokenizer (tokenizer.json)")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
    if model["type"] != "BPE" or not byte_level:
        raise ExportError("GGUF export writes byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM, GPT-2 style); "
                          f"this one is {model['type']} with a {(spec.get('decoder') or {}).get('type')} decoder "
                          "(sentencepiece-style). Export with `--to hf` and convert with llama.cpp")
    tokens: dict[int, str] = {index: token for token, index in model["vocab"].items()}
    types: dict[int, int] = {index: gguf.TokenType.NORMAL for index in tokens}
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    size = max(vocab_size, max(tokens) + 1)
    token_list, type_list = [], []
    for index in range(size):  # an embedding larger than the vocabulary gets unused placeholder rows
        token_list.append(tokens.get(index, f"[PAD{index}]"))
        type_list.append(types.get(index, gguf.TokenType.UNUSED))
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec))
    writer.add_token_list(token_list)
    writer.add_token_types(type_list)
    writer.add_token_merges(merges)
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                             (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_unk_token_id, tokenizer.unk_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            setter(token_id)
    turn_end = tokenizer.convert_tokens_to_ids(turn_end_token(tokenizer))
    if isinstance(turn_end, int) and turn_end != tokenizer.eos_token_id:
        writer.add_eot_token_id(turn_end)
    writer.add_add_bos_token(adds_bos(tokenizer))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_eos_token(len(probe) > 1 and probe[-1] == tokenizer.eos_token_id)
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        writer.add_chat_template(template)


def write_gguf(path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, quant: str,
               name: str) -> None:
    """Write ``model`` (float32) and ``tokenizer`` as one GGUF file of type ``quant``."""
    arch = _check_supported(model)
    tensor_type, file_type = QUANTS[quant]
    window = getattr(model.config, "sliding_window", None)
    if model.config.model_type == "mistral" and window and window < model.config.max_position_embeddings:
        log.warning("GGUF export: this Mistral model attends within a %d-token sliding window; llama.cpp "
                    "applies none, so replies longer than that will differ", window)
    if name == "mistral":  # exactly this name makes transformers' loader ask gguf for a "mistral" architecture
        name = "mistral-model"  # that gguf 0.19 lacks, and the file would not load back
    writer = gguf.GGUFWriter(path, arch)
    _write_hparams(writer, model, name, file_type)
    _write_tokenizer(writer, tokenizer, model.config.vocab_size)
    _write_tensors(writer, model, arch, tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tokenizer_mismatches(original: PreTrainedTokenizerBase, loaded: PreTrainedTokenizerBase) -> list[str]:
    """Where the tokenizer read back from the GGUF differs from the original, on the parity prompts."""
    problems = []
    if (original.chat_template or "") != (loaded.chat_template or ""):
        problems.append("the chat template differs")
    for prompt in PARITY_PROMPTS:
        text = render(original, [{"role": "user", "content": prompt}, {"role": "assistant", "content": "Ok, 42."}],
                      generation_prompt=False)
        expected = original(text, add_special_tokens=False)["input_ids"]
        got = loaded(text, add_special_tokens=False)["input_ids"]
        if expected != got:
            problems.append(f"{prompt!r} tokenizes differently ({len(expected)} vs {len(got)} tokens)")
    return problems


def export_gguf(target: str | Target, out: Path, quants: list[str], parity: bool = True, name: str | None = None,
                ollama: bool = False) -> tuple[ExportResult, list[GGUFFile]]:
    """Write one GGUF file per entry of ``quants`` into the folder ``out``, each checked by loading it
    back; with ``ollama``, also a Modelfile for the first of them."""
    unknown = [q for q in quants if q not in QUANTS]
    if unknown:
        raise ExportError(f"unknown GGUF type(s) {unknown}; choose from {', '.join(QUANTS)}")
    prepared = merge_for_export(target, parity)
    # registry:NAME@ALIAS and registry:NAME/VERSION name the file after NAME-ALIAS / NAME-VERSION
    name = name or re.sub(r"[^\w.-]+", "-", resolve_target(target).name).strip("-") or "model"
    files = []
    with atomic_directory(out) as staging:
        for quant in quants:
            path = staging / f"{name}-{quant}.gguf"
            write_gguf(path, prepared.model, prepared.tokenizer, quant, name)
            report = None
            if parity:
                loaded_tokenizer = AutoTokenizer.from_pretrained(staging, gguf_file=path.name)
                problems = tokenizer_mismatches(prepared.tokenizer, loaded_tokenizer)
                if problems:
                    raise ExportError(f"parity check failed for {path.name}: the tokenizer read back from it "
                                      f"differs: {'; '.join(problems[:3])}; {out} was not written")
                loaded = AutoModelForCausalLM.from_pretrained(staging, gguf_file=path.name, dtype=torch.float32)
                report = verify(loaded, prepared, f"gguf-{quant}", out, staging / f"{path.stem}.parity.json",
                                {"file": path.name})
                del loaded
            files.append(GGUFFile(out / path.name, quant, report))
        if ollama:
            text = modelfile(prepared.tokenizer, files[0].path.name, resolve_target(target).spec)
            (staging / "Modelfile").write_text(text, encoding="utf-8")
    return ExportResult(out, ",".join(quants), prepared.merged, files[-1].parity if files else None,
                        parity and not prepared.from_qlora), files
