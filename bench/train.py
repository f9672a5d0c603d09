"""Training throughput and memory: tunesmith's fast path against a plain transformers + peft loop.

    python bench/train.py --shape smollm2-135m --method lora --seq 512 --batch 8 --steps 8
    bash bench/gpu.sh                                   # every GPU row of the table, on a CUDA machine

Both paths train the same model (same config, LoRA rank/targets, dropout 0, dtype, AdamW) on the
same rows in the same order: the baseline pads each micro-batch to its longest row and lets
transformers compute the loss from full logits, as a default collator and `labels=` do; tunesmith
runs its training fast path exactly as `tunesmith train` sets it up (``apply_speedups``): rows
packed padding-free, attention per row, fused LoRA layers, the loss at label positions only with
its gradient taken chunk by chunk, never the full logits (``--fast KEY=VALUE`` switches pieces,
with the names of the ``training:`` config section).
Reported per path, after warm-up steps: non-padding tokens/s, peak memory (CUDA max allocated; on
CPU the peak RSS of a forked child that runs only that path) and MFU, then the ratios. GPU shapes
use random weights (no hub here); smollm2-135m is the embedded model.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunesmith.config.schema import MethodConfig  # noqa: E402
from tunesmith.data.collate import collate_batch  # noqa: E402
from tunesmith.data.pack import collate_padding_free  # noqa: E402
from tunesmith.data.tokenize import tokenize_rows_batched  # noqa: E402
from tunesmith.train.mfu import flops_per_token, peak_flops  # noqa: E402

from forked import run_forked  # noqa: E402  (bench/ is on sys.path when a script there runs)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (64, 128, 2, 4, 2, 49152),
    "llama-1b": (2048, 8192, 16, 32, 8, 128256),
    "llama-8b": (4096, 14336, 32, 32, 8, 128256),
}


def _random_folder(shape: str, dtype: torch.dtype) -> Path:
    """A random-init Llama of ``shape`` saved once per machine (no hub here; the weights do not
    matter for speed), so every path loads it the same way, 4-bit included."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"tunesmith-bench-{shape}"
    if not (folder / "config.json").is_file():
        hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
        config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                             max_position_embeddings=131072, tie_word_embeddings=False)
        torch.manual_seed(0)
        # initialised on the GPU where there is one: an 8B model's random init takes minutes on CPU
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.save_pretrained(folder)
        del model
    return folder


def build_model(shape: str, method: str, device: torch.device, checkpointing: bool = False):
    """The same model for both paths: loaded by transformers (4-bit by bitsandbytes for qlora), the
    method applied by peft; LoRA r16 on all linear layers, dropout 0."""
    from tunesmith.adapters.apply import apply_method
    from tunesmith.config.schema import ModelConfig, QuantizationConfig
    from tunesmith.models.load import load_model, prepare_embedded

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    folder = prepare_embedded() if shape == "smollm2-135m" else _random_folder(shape, dtype)
    quantization = QuantizationConfig() if method == "qlora" else None
    model = load_model(ModelConfig(name_or_path=str(folder), device=device.type), quantization)
    method_config = MethodConfig.model_validate({"type": method, "lora": {"r": 16, "alpha": 32, "dropout": 0.0}})
    return apply_method(model, method_config, gradient_checkpointing=checkpointing)


def load_rows(data: Path, seq: int, count: int, tokenizer_path: str = "embedded") -> list[dict]:
    """Alpaca rows through the chat template of the embedded (or another) tokenizer, truncated to ``seq`` tokens."""
    from tunesmith.config.schema import ModelConfig
    from tunesmith.data.formats import to_canonical
    from tunesmith.models.load import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=tokenizer_path))
    raw = json.loads(data.read_text()) if data.suffix == ".json" else [json.loads(x) for x in data.open()]
    rows = [to_canonical(r, "alpaca")[0] for r in raw]
    tokenized = tokenize_rows_batched(tokenizer, [r for r in rows if r is not None], seq)
    items = [{"input_ids": t.input_ids, "labels": t.labels} for t in tokenized if not isinstance(t, Exception)]
    return [items[i % len(items)] for i in range(count)]


def baseline_step(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss


def fast_config(pairs: list[str]):
    """The tunesmith path's ``training:`` settings: defaults, then ``--fast KEY=VALUE`` pairs."""
    from tunesmith.config.load import apply_overrides
    from tunesmith.config.schema import TrainingConfig

    return TrainingConfig.model_validate(apply_overrides({"lr": 1e-4}, pairs))


class PathRunner:
    """One path set up for training: the model, its optimizer and one step's code."""

    def __init__(self, path: str, args: argparse.Namespace, device: torch.device):
        from tunesmith.models.fastpath import apply_speedups
        from tunesmith.recipes.sft import SFTObjective
        from tunesmith.train.optim import build_optimizer

        self.path, self.device = path, device
        self.model = build_model(args.shape, args.method, device, args.checkpointing)
        self.model.train()
        self.training = fast_config(args.fast if path == "tunesmith" else [])
        self.applied = []
        if path == "baseline":
            self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        else:
            self.applied = apply_speedups(self.model, self.training, padding_free=self.training.padding_free)
            self.optimizer = build_optimizer(self.model, self.training)
        self.objective = SFTObjective(chunked=self.training.chunked_loss, liger=self.training.liger)

    def step(self, chunk: list[dict]) -> torch.Tensor:
        if self.path == "baseline":
            batch = {k: v.to(self.device) for k, v in collate_batch(chunk, 0).items()}
            loss = baseline_step(self.model, batch)
            loss.backward()
        else:
            packed = self.training.padding_free
            batch = {k: v.to(self.device) for k, v in
                     (collate_padding_free(chunk) if packed else collate_batch(chunk, 0)).items()}
            offload = self.training.offload_activations and self.device.type == "cuda"
            with torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext():
                loss = self.objective.loss_sum(self.model, batch) / max(self.objective.units(batch), 1)
                loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return loss.detach()


def micro_batches(path: str, args: argparse.Namespace, rows: list[dict]) -> list[list[dict]]:
    """The micro-batches a path trains: ``--batch`` rows each, or on the tunesmith path with
    ``--batch-tokens`` whole rows packed up to that many tokens (``training.batch_tokens``)."""
    if path == "tunesmith" and args.batch_tokens:
        from tunesmith.train.loop import pack_by_tokens

        packs = pack_by_tokens([len(r["input_ids"]) for r in rows], args.batch_tokens, list(range(len(rows))))
        return [[rows[i] for i in pack] for pack in packs]
    return [rows[i:i + args.batch] for i in range(0, len(rows), args.batch)]


def run_path(path: str, args: argparse.Namespace, rows: list[dict], device: torch.device) -> dict:
    runner = PathRunner(path, args, device)
    batches = micro_batches(path, args, rows)
    if len(batches) < args.warmup + args.steps:
        raise SystemExit(f"{path}: {len(batches)} micro-batches from {len(rows)} rows, fewer than --warmup + --steps")
    tokens = measured = 0
    started = time.perf_counter()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:  # warm-up done: measure from here
            started = time.perf_counter()
            tokens = measured = 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        chunk = batches[step]
        loss = runner.step(chunk)
        tokens += sum(len(r["input_ids"]) for r in chunk)
        measured += 1
    elapsed = time.perf_counter() - started
    mean_seq = sum(len(r["input_ids"]) for r in rows) / len(rows)
    flops, formula = flops_per_token(runner.model, mean_seq)
    tokens_per_s = tokens / elapsed
    peak = peak_flops(device)
    result = {"path": path, "shape": args.shape, "method": args.method, "seq": args.seq, "batch": args.batch,
              "batch_tokens": args.batch_tokens if path == "tunesmith" else None,
              "rows_per_micro_batch": round(sum(len(b) for b in batches[args.warmup:args.warmup + args.steps])
                                            / args.steps, 1),
              "steps": measured, "tokens_per_s": round(tokens_per_s, 1), "final_loss": round(float(loss), 4),
              "mfu": round(tokens_per_s * flops / peak, 4) if peak else None, "mfu_formula": formula,
              "peak_tflops": peak / 1e12 if peak else None, "fast_path": runner.applied,
              "settings": args.fast if path == "tunesmith" else [], "checkpointing": args.checkpointing}
    if device.type == "cuda":
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def longest_context(path: str, args: argparse.Namespace, device: torch.device, vocab: int) -> dict:
    """The longest single row (batch 1, loss on every token) that trains a step without running out
    of memory: doubling from 8,192 tokens, then bisecting to 1,024."""
    runner = PathRunner(path, args, device)
    generator = torch.Generator().manual_seed(0)

    def fits(length: int) -> bool:
        ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
        try:
            runner.step([{"input_ids": ids, "labels": ids}])
            return True
        except torch.OutOfMemoryError:
            runner.optimizer.zero_grad(set_to_none=True)
            return False
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    good, bad = 0, 8192
    while fits(bad) and bad < args.max_probe:
        good, bad = bad, bad * 2
        print(f"  {path}: {good:,} tokens fit", flush=True)
    while bad - good > 1024:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return {"path": path, "shape": args.shape, "method": args.method, "longest_context": good,
            "fast_path": runner.applied, "settings": args.fast if path == "tunesmith" else []}


def run_isolated(path: str, args: argparse.Namespace, rows: list[dict], device: torch.device) -> dict:
    """On CPU, run the path in a forked child so its peak RSS is its own."""
    if device.type == "cuda":
        return run_path(path, args, rows, device)
    result = run_forked(lambda: run_path(path, args, rows, device))
    if "error" in result:
        raise SystemExit(f"{path} failed: {result['error']}")
    result["peak_memory_mb"] = result.pop("peak_rss_mb")
    return result


def record(out: Path, results: list[dict]) -> None:
    """Append the results to the JSON-lines file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        for result in results:
            handle.write(json.dumps({**result, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                     "threads": torch.get_num_threads(),
                                     "ru_maxrss_parent_mb": round(resource.getrusage(resource.RUSAGE_SELF)
                                                                  .ru_maxrss / 1024, 1)}) + "\n")


def find_max_seq(args: argparse.Namespace, device: torch.device) -> None:
    if device.type != "cuda":
        raise SystemExit("--find-max-seq measures GPU memory: run it on a CUDA machine")
    vocab = 49152 if args.shape == "smollm2-135m" else SHAPES[args.shape][5]
    total = torch.cuda.get_device_properties(device).total_memory
    if args.memory_cap_gb * 2**30 < total:  # a larger card measured as the 80 GB one the targets name
        torch.cuda.set_per_process_memory_fraction(args.memory_cap_gb * 2**30 / total, device)
        print(f"memory capped at {args.memory_cap_gb} GiB of {total / 2**30:.0f}", flush=True)
    results = []
    for path in ("baseline", "tunesmith"):
        results.append(longest_context(path, args, device, vocab))
        gc.collect()
        torch.cuda.empty_cache()
    record(args.out, results)
    base, ours = results
    print(f"longest trainable row at batch 1, {args.shape} {args.method}, "
          f"{torch.cuda.get_device_name(device)}: baseline {base['longest_context']:,} tokens, "
          f"tunesmith {ours['longest_context']:,} tokens ({ours['longest_context'] / max(base['longest_context'], 1):.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["smollm2-135m", *SHAPES], default="smollm2-135m")
    parser.add_argument("--method", choices=["lora", "qlora", "full"], default="lora")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batch-tokens", type=int, metavar="N",
                        help="the tunesmith path packs whole rows into micro-batches of up to N tokens "
                             "(training.batch_tokens); the baseline keeps --batch rows")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--data", type=Path, default=SHARED / "alpaca_cleaned_sample.json")
    parser.add_argument("--tokenizer", default="embedded",
                        help="a tokenizer folder for the random-weight shapes (default: the embedded model's)")
    parser.add_argument("--out", type=Path, default=Path("bench/train-results.jsonl"))
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on both paths")
    parser.add_argument("--fast", action="append", default=[], metavar="KEY=VALUE",
                        help="a training setting for the tunesmith path, e.g. fused_lora=off or optimizer=adamw_fused")
    parser.add_argument("--find-max-seq", action="store_true",
                        help="instead of throughput: the longest row each path trains at batch 1 (CUDA)")
    parser.add_argument("--max-probe", type=int, default=1 << 20, help="--find-max-seq stops doubling here")
    parser.add_argument("--memory-cap-gb", type=float, default=80.0,
                        help="--find-max-seq: the memory both paths may use (GiB; default 80, the targets' card)")
    args = parser.parse_args()
    fast_config(args.fast)  # a bad setting fails here, before anything runs
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.find_max_seq:
        find_max_seq(args, device)
        return
    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found: pass --data with an Alpaca-style JSON/JSONL file")
    torch.set_num_threads(os.cpu_count() or 1)
    wanted = args.batch * (args.warmup + args.steps)
    rows = load_rows(args.data, args.seq, wanted, args.tokenizer)
    if args.batch_tokens:  # enough rows for the packed micro-batches too (the baseline uses the first ones)
        mean = sum(len(r["input_ids"]) for r in rows) / len(rows)
        packed = math.ceil(1.2 * (args.warmup + args.steps) * args.batch_tokens / mean) + args.batch
        rows = load_rows(args.data, args.seq, max(wanted, packed), args.tokenizer)
    padded = sum(max(len(r["input_ids"]) for r in rows[i:i + args.batch]) * len(rows[i:i + args.batch])
                 for i in range(0, len(rows), args.batch))
    real = sum(len(r["input_ids"]) for r in rows)
    print(f"{args.shape} {args.method} on {device.type}: {len(rows)} rows, {real:,} tokens, "
          f"{100 * (1 - real / padded):.1f}% of the baseline's batch is padding")
    results = []
    for path in ("baseline", "tunesmith"):
        results.append(run_isolated(path, args, rows, device))
        if device.type == "cuda":  # nothing of one path's memory may count against the next
            gc.collect()
            torch.cuda.empty_cache()
    base, ours = results
    ratio = {"tokens_per_s_ratio": round(ours["tokens_per_s"] / base["tokens_per_s"], 3),
             "peak_memory_ratio": round(ours["peak_memory_mb"] / base["peak_memory_mb"], 3)}
    record(args.out, results)
    print(f"{'path':<10} {'tokens/s':>10} {'peak MB':>10} {'MFU':>8} {'loss':>8}")
    for r in results:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{r['path']:<10} {r['tokens_per_s']:>10,.1f} {r['peak_memory_mb']:>10,.0f} {mfu:>8} "
              f"{r['final_loss']:>8.4f}")
    print(f"tunesmith / baseline: {ratio['tokens_per_s_ratio']}x tokens/s, {ratio['peak_memory_ratio']}x peak memory")
    print(f"tunesmith fast path: {', '.join(ours['fast_path']) or 'padding-free rows and chunked loss only'}")
    print(f"MFU: tokens/s x ({ours['mfu_formula']}) / peak {ours['peak_tflops'] or 'n/a'} TFLOP/s"
          + ("" if ours["peak_tflops"] else " (no known peak for this device: MFU not computed)"))


if __name__ == "__main__":
    main()
