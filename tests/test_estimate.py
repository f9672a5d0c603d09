"""`tunesmith estimate`: the memory account against what runs measure, and the command.

The estimator's figure is checked against (1) what autograd saves per decoder layer (counted with
saved-tensor hooks), (2) the peak RSS increase of tiny and embedded-model CPU runs, each in its own
process, (3) the H200 rows of ``../shared/bench-results`` (CUDA max-allocated) and (4) the
memory ratios of the GPU table in docs/speed.md. Each check prints its error.

The per-layer check can fail: with transformers' RMSNorm planted as keeping its input as is (not an
fp32 copy), the three bf16 cases failed at -6.7% to -9.4% against the 5% bound; the plant was removed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_tree, write_jsonl

from tunesmith import estimate as est
from tunesmith.config.load import build_config
from tunesmith.config.schema import ModelConfig

REPO = Path(__file__).resolve().parents[1]
BENCH_FILES = [REPO / "bench" / "train-results.jsonl", REPO.parent / "shared" / "bench-results" / "h200-2026-11-28.jsonl"]
BENCH_SHAPES = {"llama-1b": (2048, 8192, 16, 32, 8, 128256), "llama-8b": (4096, 14336, 32, 32, 8, 128256)}
TOLERANCE = 0.15


def bench_arch(shape: str) -> est.Architecture:
    hidden, inter, layers, heads, kv, vocab = BENCH_SHAPES[shape]
    return est.Architecture("llama", hidden, inter, layers, heads, kv, hidden // heads, vocab, tied=False)


def long_rows(count: int = 8, n: int = 150) -> list[dict]:
    """Identical chat rows longer than the runs' max_seq_len, so every row is truncated to exactly it."""
    reply = " ".join(str(i) for i in range(1, n + 1))
    return [{"messages": [{"role": "user", "content": f"Count to {n}."}, {"role": "assistant", "content": reply}]}
            for _ in range(count)]


# ---- the architecture, read from config.json ----


def _safetensors_params(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    return total


def test_architecture_counts_the_parameters_of_the_saved_models(tiny_model_dir, embedded_dir):
    for name in (str(tiny_model_dir), "embedded"):
        arch = est.load_architecture(ModelConfig(name_or_path=name))
        folder = tiny_model_dir if name != "embedded" else embedded_dir
        assert arch.params == _safetensors_params(folder), name
    assert est.load_architecture(ModelConfig()).model_type == "llama"


# ---- (1) per-layer activations against autograd's saved tensors ----


def _saved_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves in a forward of the decoder (parameters aside)."""
    from tunesmith.models.fastpath import decoder_and_head

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    decoder, _ = decoder_and_head(model)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        decoder(**batch, use_cache=False)
    return sum(seen.values())


def _saved_per_layer_token(dtype: torch.dtype, method: str, dropout: float, fused: bool) -> float:
    """Bytes autograd saves per token in one decoder layer of a small Llama on CPU (two model depths,
    differenced, so the embeddings and head cancel)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.adapters.apply import apply_method
    from tunesmith.config.schema import MethodConfig, TrainingConfig
    from tunesmith.models.fastpath import apply_speedups

    counts = []
    for layers in (1, 3):
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=256, intermediate_size=896, num_hidden_layers=layers, num_attention_heads=8,
                             num_key_value_heads=2, vocab_size=512, attn_implementation="sdpa")
        model = apply_method(LlamaForCausalLM(config).to(dtype), MethodConfig.model_validate(
            {"type": method, "lora": {"r": 8, "dropout": dropout}})).train()
        apply_speedups(model, TrainingConfig(fused_lora="blas" if fused else "off", liger=False), True)
        batch = {"input_ids": torch.randint(0, 512, (1, 256)), "position_ids": torch.arange(64).repeat(4)[None]}
        counts.append(_saved_bytes(model, batch))
    return (counts[1] - counts[0]) / 2 / 256


@pytest.mark.parametrize("dtype,method,dropout,fused", [
    (torch.float32, "lora", 0.0, True), (torch.float32, "lora", 0.05, False), (torch.float32, "full", 0.0, False),
    (torch.bfloat16, "lora", 0.0, True), (torch.bfloat16, "lora", 0.0, False), (torch.bfloat16, "full", 0.0, False)])
def test_layer_activations_match_what_autograd_saves(dtype, method, dropout, fused):
    arch = est.Architecture("llama", 256, 896, 2, 8, 2, 32, 512, tied=False)
    plan = est.Plan(task="sft", method=method, device="cpu", gpus=1, strategy="single", micro_batch=4, grad_accum=1,
                    seq_len=64, checkpointing=False, param_bytes=dtype.itemsize, autocast=False, optimizer="adamw",
                    padding_free=True, loss="chunked", liger=False, fused_lora=fused, lora_r=8, lora_dropout=dropout)
    measured = _saved_per_layer_token(dtype, method, dropout, fused)
    estimated = est.layer_activation_bytes(arch, plan, trains=method == "full")
    error = estimated / measured - 1
    print(f"\nsaved per layer per token, {dtype} {method} dropout {dropout} fused {fused}: "
          f"estimated {estimated:,.0f} B, autograd {measured:,.0f} B, error {error:+.1%}")
    assert abs(error) < 0.05


# ---- (2) CPU runs: the peak RSS increase over a process that has only imported ----
# summary.json's peak_memory_mb is ru_maxrss, which in a process started from another starts at the
# starting process's high-water mark (exec keeps it); VmHWM, reset after the imports, is the run's own.

RUN_IN_A_PROCESS = """
import ctypes, gc, json, sys
import torch, transformers, peft, datasets, accelerate  # noqa: F401
from tunesmith.cli.train import recipe_for
from tunesmith.config.load import build_config
import tunesmith.recipes.sft  # noqa: F401

def status(key):
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith(key))

for tree in json.loads(sys.argv[1]):
    config = build_config(tree)
    recipe = recipe_for(config.task)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what the last case freed goes back to the system
    with open("/proc/self/clear_refs", "w") as handle:  # the high-water mark restarts at the current RSS
        handle.write("5")
    baseline = status("VmRSS:")
    recipe(config)
    print(json.dumps({"baseline_mb": baseline, "peak_mb": status("VmHWM:")}), flush=True)
"""

# (name, model, method, rows per micro-batch, tokens per row, training overrides)
CPU_CASES = [
    ("tiny LoRA (the runtime's own memory)", "tiny", "lora", 2, 64, {}),
    ("tiny LoRA, full logits", "tiny", "lora", 4, 512, {"chunked_loss": False}),
    ("embedded LoRA", "embedded", "lora", 2, 256, {}),
    ("embedded full", "embedded", "full", 2, 128, {}),
]


def _cpu_tree(model_dir: Path, data: Path, out: Path, method: str, rows: int, tokens: int, training: dict) -> dict:
    tree = tiny_tree(model_dir, data, out, method, max_steps=2, batch_size=rows, save_every=None, **training)
    tree["data"].update(max_seq_len=tokens, train_on_prompt=True)  # every row cut to `tokens`, every token a label
    return tree


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.long
def test_cpu_peak_rss_within_15_percent(tiny_model_dir, tmp_path):
    """One process imports once, then runs each case with its high-water mark reset (freed memory
    trimmed back to the system first); the increase over the RSS at the reset is the run's."""
    data = write_jsonl(tmp_path / "long.jsonl", long_rows())
    trees = []
    for index, (_, model, method, rows, tokens, training) in enumerate(CPU_CASES):
        folder = tiny_model_dir if model == "tiny" else Path("embedded")
        trees.append(_cpu_tree(folder, data, tmp_path / "runs" / str(index), method, rows, tokens, training))
        trees[-1]["model"]["name_or_path"] = str(folder) if model == "tiny" else "embedded"
    done = subprocess.run([sys.executable, "-c", RUN_IN_A_PROCESS, json.dumps(trees)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    errors = {}
    for (name, *_), tree, measured in zip(CPU_CASES, trees, results, strict=True):
        increase = (measured["peak_mb"] - measured["baseline_mb"]) * est.MiB
        config = build_config(tree)
        arch = est.load_architecture(config.model)
        memory = est.estimate_memory(arch, est.plan_from_config(config, arch))
        errors[name] = memory.peak / increase - 1
        print(f"\nCPU {name}: estimated {memory.peak / est.MiB:,.0f} MiB ({memory.moment}), measured increase "
              f"{increase / est.MiB:,.0f} MiB, error {errors[name]:+.1%}")
    assert all(abs(e) <= TOLERANCE for e in errors.values()), errors


# ---- (3) the H200 rows of bench/train.py and (4) the GPU table of docs/speed.md ----


@pytest.fixture(scope="module")
def bench_module():
    """bench/train.py, for its ``load_rows``: the rows each benchmark step trained on."""
    import importlib.util

    sys.path.insert(0, str(REPO / "bench"))  # bench/train.py imports its neighbour forked.py
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "bench" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_estimate(shape: str, method: str, path: str, seq: int, batch: int, checkpointing: bool,
                    fused_adamw: bool, chunks: list[list[dict]]) -> tuple[float, float]:
    """(peak bytes, tokens/s) estimated for a bench path: the peak is the largest over the measured
    steps' micro-batches (rows packed on tunesmith's path, padded to the longest on the baseline's); the
    speed is their tokens over their estimated time."""
    fast = path == "tunesmith"
    peaks, seconds, tokens = [], 0.0, 0
    for chunk in chunks:
        lengths = tuple(len(r["input_ids"]) for r in chunk)
        plan = est.Plan(task="sft", method=method, device="cuda", gpus=1, strategy="single", micro_batch=batch,
                        grad_accum=1, seq_len=seq, checkpointing=checkpointing, param_bytes=2, autocast=False,
                        optimizer="adamw_fused" if fast and fused_adamw else "adamw" if fast else "adamw_foreach",
                        padding_free=fast,
                        loss="liger" if fast else "transformers", liger=fast, fused_lora=fast and method == "lora",
                        trains_embeddings=method == "full", trains_head=method == "full",
                        rows=lengths, mean_row_tokens=sum(lengths) / len(lengths),
                        label_tokens=sum(sum(1 for t in r["labels"][1:] if t != -100) for r in chunk))
        peaks.append(est.estimate_memory(bench_arch(shape), plan).peak)
        seconds += est.estimate_time(bench_arch(shape), plan, 1).seconds_per_step
        tokens += sum(lengths)
    return max(peaks), tokens / seconds


_TOKENIZED: dict[tuple[Path, int], list[dict]] = {}


def _bench_rows(bench_module, data: Path, seq: int, count: int) -> list[dict]:
    """bench/train.py's rows (the file's rows in order, cycled), tokenized once per file and length."""
    if (data, seq) not in _TOKENIZED:
        _TOKENIZED[data, seq] = bench_module.load_rows(data, seq, 2048)
    return _TOKENIZED[data, seq][:count]


def _measured_chunks(bench_module, shared_data: Path, row: dict) -> list[list[dict]] | None:
    """The micro-batches of a bench row's measured steps: its data (long rows where the mean row
    length in its MFU formula says so) and warm-up steps, found by matching that mean."""
    mean = float(re.search(r"s=(\d+)", row["mfu_formula"]).group(1))
    data = shared_data / ("gsm8k_long_alpaca.json" if mean > 500 else "alpaca_cleaned_sample.json")
    for warmup in range(6):
        rows = _bench_rows(bench_module, data, row["seq"], row["batch"] * (warmup + row["steps"]))
        if abs(sum(len(r["input_ids"]) for r in rows) / len(rows) - mean) < 0.6:
            return [rows[i * row["batch"]:(i + 1) * row["batch"]] for i in range(warmup, warmup + row["steps"])]
    return None


def test_gpu_bench_rows_within_15_percent(bench_module, shared_data):
    rows = [json.loads(line) for file in BENCH_FILES if file.is_file() for line in file.read_text().splitlines()
            if line.strip()]
    rows = [r for r in rows if r.get("peak_tflops") and r.get("peak_memory_mb") and r.get("shape") in BENCH_SHAPES]
    if not rows:
        pytest.skip("no GPU rows in bench/train-results.jsonl or ../shared/bench-results")
    errors = {}
    for row in rows:
        chunks = _measured_chunks(bench_module, shared_data, row)
        assert chunks is not None, f"cannot tell which rows {row} trained on"
        estimated, speed = _bench_estimate(row["shape"], row["method"], row["path"], row["seq"], row["batch"],
                                           row["checkpointing"], "optimizer=adamw_fused" in row["settings"], chunks)
        name = (f"{row['path']} {row['shape']} {row['method']} {row['batch']} x {row['seq']}"
                f"{' checkpointing' if row['checkpointing'] else ''}")
        errors[name] = estimated / (row["peak_memory_mb"] * est.MiB) - 1
        print(f"\nGPU {name}: estimated {estimated / est.MiB:,.0f} MiB, measured {row['peak_memory_mb']:,.0f} MiB, "
              f"error {errors[name]:+.1%}; tokens/s estimated {speed:,.0f}, measured {row['tokens_per_s']:,.0f} "
              f"(time is not held to 15%)")
    assert all(abs(e) <= TOLERANCE for e in errors.values()), errors


def test_docs_gpu_table_memory_ratios(bench_module, shared_data):
    """docs/speed.md gives tunesmith / baseline peak-memory ratios (no absolute figures) of bench/gpu.sh's
    rows on an H100 (Alpaca rows, 3 warm-up and 10 measured steps): the estimate's ratio against each."""
    table = [line for line in (REPO / "docs" / "speed.md").read_text().splitlines() if line.startswith("| Llama-")]
    assert len(table) == 3
    errors = {}
    for line in table:
        label, ratio = line.split("|")[1].strip(), float(line.split("|")[-2].strip().rstrip("×"))
        shape = "llama-1b" if "1B" in label else "llama-8b"
        method = "qlora" if "QLoRA" in label else "lora" if "LoRA" in label else "full"
        batch, seq = (int(x.replace(",", "")) for x in re.search(r"(\d+) × ≤([\d,]+)", label).groups())
        rows = _bench_rows(bench_module, shared_data / "alpaca_cleaned_sample.json", seq, batch * 13)
        chunks = [rows[i * batch:(i + 1) * batch] for i in range(3, 13)]
        peaks = [_bench_estimate(shape, method, path, seq, batch, "checkpointing" in label, method != "qlora",
                                 chunks)[0] for path in ("baseline", "tunesmith")]
        errors[label] = (peaks[1] / peaks[0]) / ratio - 1
        print(f"\ndocs table {label}: estimated ratio {peaks[1] / peaks[0]:.2f}, measured {ratio:.2f}, "
              f"error {errors[label]:+.1%}")
    assert all(abs(e) <= TOLERANCE for e in errors.values()), errors


# ---- the account's structure: reference models, generation, strategies ----


def _plan(**changes) -> est.Plan:
    base = est.Plan(task="sft", method="lora", device="cuda", gpus=1, strategy="single", micro_batch=4, grad_accum=1,
                    seq_len=1024, checkpointing=False, param_bytes=2, autocast=True, optimizer="adamw_fused",
                    padding_free=True, loss="liger", liger=True, fused_lora=False, lora_dropout=0.05)
    return dataclasses.replace(base, **changes)


def test_reference_model_is_a_copy_only_for_full_and_freeze():
    arch = bench_arch("llama-1b")
    lora = est.estimate_memory(arch, _plan(task="dpo", loss="labels", reference="adapters-off", rows_per_unit=2))
    full = est.estimate_memory(arch, _plan(task="dpo", method="full", loss="labels", reference="copy",
                                            rows_per_unit=2, trains_embeddings=True, trains_head=True))
    assert lora.parts["reference model"] == 0
    assert full.parts["reference model"] == est.weight_bytes(arch, _plan(method="full"))[0]


def test_generation_cache_and_fsdp_sharding():
    arch = bench_arch("llama-8b")
    grpo = est.estimate_memory(arch, _plan(task="grpo", loss="labels", rows_per_unit=4, prompt_tokens=512,
                                           generation_rows=16, micro_batch=4))
    assert grpo.moments["generation"] > 0
    cache, _ = est.generation_bytes(arch, _plan(generation_rows=16))
    assert cache == 16 * 1024 * 2 * 32 * 1024 * 2  # rows x positions x (k, v) x layers x kv width x bf16
    full = _plan(method="full", optimizer="adamw", trains_embeddings=True, trains_head=True)
    single = est.estimate_memory(arch, full)
    sharded = est.estimate_memory(arch, dataclasses.replace(full, gpus=8, strategy="fsdp"))
    replicated = est.estimate_memory(arch, dataclasses.replace(full, gpus=8, strategy="ddp"))
    assert sharded.parts["weights"] == single.parts["weights"] / 8
    assert sharded.parts["optimizer state"] == single.parts["optimizer state"] / 8
    assert replicated.peak > single.peak > sharded.peak
    zero2 = est.estimate_memory(arch, dataclasses.replace(full, gpus=8, strategy="zero2"))
    zero3 = est.estimate_memory(arch, dataclasses.replace(full, gpus=8, strategy="zero3"))
    assert zero2.parts["weights"] == single.parts["weights"], "ZeRO-2 replicates the weights"
    assert zero2.parts["optimizer state"] == sharded.parts["optimizer state"] and "DDP buckets" not in zero2.parts
    assert zero3.parts == sharded.parts, "ZeRO-3 shards as FSDP2 does"
    assert replicated.peak > zero2.peak > zero3.peak


def test_recommendation_fits_where_the_config_does_not(tmp_path):
    from transformers import LlamaConfig

    folder = tmp_path / "llama-8b-shape"  # config.json only: nothing loads weights
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False).save_pretrained(folder)
    data = write_jsonl(tmp_path / "rows.jsonl", long_rows(4))
    tree = tiny_tree(folder, data, tmp_path / "runs", "full", batch_size=8)
    tree["model"]["device"] = "auto"
    tree["data"]["max_seq_len"] = 4096
    config = build_config(tree)
    arch = est.load_architecture(config.model)
    plan = est.plan_from_config(config, arch, gpus=8, strategy="ddp")
    report = est.estimate(arch, plan, steps=100, gpu_memory=80 * est.GiB)
    assert not report.written.fits  # 8B full fine-tuning does not fit one 80 GB device per process under DDP
    best = report.recommended
    assert best is not None and best.fits and best.plan.method == "full" and best.plan.strategy == "fsdp"
    assert best.memory.peak <= est.FIT_SHARE * 80 * est.GiB


# ---- the command ----


def _config_file(tmp_path: Path, model_dir: Path, **training) -> Path:
    import yaml

    data = write_jsonl(tmp_path / "rows.jsonl", long_rows(24))
    tree = tiny_tree(model_dir, data, tmp_path / "runs", "lora", **training)
    tree["model"]["device"] = "auto"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_command_prints_the_breakdown_alternatives_and_json(tiny_model_dir, tmp_path, capsys):
    from tunesmith.cli.main import main

    config = _config_file(tmp_path, tiny_model_dir)
    assert main(["estimate", str(config), "--gpus", "2", "--gpu-memory", "24GB", "--price-per-gpu-hour", "2.5",
                 "--steps", "1000"]) == 0
    text = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + text)
    for words in ("weights", "activations", "peak", "without checkpointing", "GPU-hours", "alternatives",
                  "recommended", "assumptions", "utilisation"):
        assert words in text
    assert main(["estimate", str(config), "--json", "training.max_steps=50"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["as_written"]["time"]["steps"] == 50 and report["recommended"]["fits"]
    assert report["as_written"]["memory"]["peak_bytes"] == sum(report["as_written"]["memory"]["parts_bytes"].values())
    # The config's own strategy is the one estimated: DeepSpeed's stage 3, with its stages among the alternatives.
    assert main(["estimate", str(config), "--json", "--gpus", "2", "training.distributed=deepspeed",
                 "training.deepspeed.stage=3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["as_written"]["plan"]["strategy"] == "zero3"
    assert {"zero2", "zero3", "fsdp"} <= {o["plan"]["strategy"] for o in report["alternatives"]}


def test_bad_input_names_the_field(tiny_model_dir, tmp_path, capsys):
    from tunesmith.cli.main import main

    config = _config_file(tmp_path, tiny_model_dir)
    assert main(["estimate", str(config), "training.batch_size=0"]) == 2
    assert "training.batch_size" in capsys.readouterr().err
    assert main(["estimate", str(config), "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err
    assert main(["estimate", str(config), "--gpus", "0"]) == 2
    assert "--gpus" in capsys.readouterr().err
