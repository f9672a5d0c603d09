"""Rollout speed: what samples GRPO's completions, on the embedded model with a LoRA adapter.

    python bench/rollouts.py [--repeats 3] [--prompts 2] [--group 4] [--max-new-tokens 64] [--grpo-steps 4]

1. Generation alone, one GRPO batch (``--prompts`` x ``--group`` completions of up to ``--max-new-tokens``
   tokens, sampled at temperature 1; completions stop at EOS, so each side's token count is printed): plain transformers + peft; the same model after the training fast path is
   switched on, generating with its kernels (what GRPO did before); ``grpo.engine: hf`` (the fast path off
   for the call); ``grpo.engine: vllm`` (the colocated server, its weights in bfloat16 on CPU). Wall time and,
   for the in-process sides, this process's CPU time (which another job on the machine does not inflate),
   the best of ``--repeats``.
2. ``--grpo-steps`` steps of GRPO with each engine (GSM8K prompts from ../shared/data when present, else
   the shipped arithmetic prompts): seconds per step after the first (vLLM's start-up is in the first).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tunesmith.config.load import build_config
from tunesmith.generate.rollout import HFRollouts, VLLMRollouts
from tunesmith.generate.sample import SamplingConfig, sample_batch
from tunesmith.generate.vllm import find_python
from tunesmith.models.fastpath import apply_speedups, packs_padding_free
from tunesmith.recipes.base import build_trainable_model, start_run

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"
QUESTIONS = ["Name three colors and say why you like them.", "What is 17 times 3? Explain.",
             "Tell me about bees.", "Write a short poem about rain."]


def timed(function, repeats: int) -> tuple[float, float, list[list[int]]]:
    """(best wall seconds, best CPU seconds, the last output) over ``repeats`` calls."""
    walls, cpus, out = [], [], None
    for repeat in range(repeats):
        torch.manual_seed(repeat)
        wall, cpu = time.perf_counter(), time.process_time()
        out = function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), out


def prompts_file(out: Path, count: int) -> Path:
    rows = []
    if GSM8K.is_file():
        for line in GSM8K.open():
            row = json.loads(line)
            rows.append({"messages": [{"role": "user", "content": row["question"]},
                                      {"role": "assistant", "content": row["answer"]}]})
            if len(rows) == count:
                break
    path = out / "prompts.jsonl"
    if rows:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    return ROOT / "examples" / "data" / "math.jsonl"


def tree(args: argparse.Namespace, data: Path, out: Path, engine: str = "hf") -> dict:
    return {"name": f"rollouts-{engine}", "task": "grpo", "model": {"name_or_path": "embedded", "device": "cpu"},
            "data": {"train": str(data), "max_seq_len": 512},
            "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
            "training": {"lr": 1e-4, "max_steps": max(args.grpo_steps, 1), "batch_size": args.prompts, "warmup_steps": 0,
                         "log_every": 1, "seed": 0, "save_every": 1000},
            "grpo": {"group_size": args.group, "max_new_tokens": args.max_new_tokens, "engine": engine},
            "output": {"dir": str(out)}, "tracking": {"backends": []}}


def generation(args: argparse.Namespace, out: Path) -> None:
    config = build_config(tree(args, prompts_file(out, 8), out))
    accelerator, source, tokenizer = start_run(config)
    model = build_trainable_model(config, source, accelerator.device, tokenizer)
    questions = (QUESTIONS * args.prompts)[:args.prompts]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in questions for _ in range(args.group)]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0)
    rows = [("transformers + peft (plain)", timed(lambda: sample_batch(model, tokenizer, prompts, sampling),
                                                  args.repeats))]
    apply_speedups(model, config.training, packs_padding_free(config, model))
    rows.append(("fast path on, generating with it",
                 timed(lambda: sample_batch(model, tokenizer, prompts, sampling), args.repeats)))
    engine = HFRollouts(tokenizer)
    rows.append(("grpo.engine hf (fast path off for the call)",
                 timed(lambda: engine.sample(model, prompts, sampling), args.repeats)))
    try:
        python = find_python()
    except Exception as err:  # noqa: BLE001 - the bench goes on without vLLM
        print(f"vLLM skipped: {err}", file=sys.stderr)
        python = None
    if python is not None:
        vllm_engine = VLLMRollouts(tokenizer, source[0], 16, 512, out / "vllm.log", python)
        try:
            vllm_engine.sample(model, prompts[:1], SamplingConfig(max_new_tokens=2))  # start-up, not timed
            rows.append(("grpo.engine vllm (bf16, colocated server)",
                         timed(lambda: vllm_engine.sample(model, prompts, sampling), args.repeats)))
        finally:
            vllm_engine.close()
    print(f"\ngeneration of one GRPO batch: {len(prompts)} completions x {args.max_new_tokens} tokens, "
          f"temperature 1, embedded model + LoRA r 16, best of {args.repeats}:\n")
    print("| engine | wall s | CPU s (this process) | tokens (last call) | tokens/s (wall) |")
    print("|---|---|---|---|---|")
    for name, (wall, cpu, output) in rows:
        cpu_text = f"{cpu:.2f}" if "vllm" not in name else "(another process)"
        tokens = sum(len(o) for o in output)
        print(f"| {name} | {wall:.2f} | {cpu_text} | {tokens} | {tokens / wall:.0f} |")


def grpo(args: argparse.Namespace, out: Path) -> None:
    from tunesmith.recipes.grpo import run_grpo
    data = prompts_file(out, 64)
    print(f"\nGRPO, {args.grpo_steps} steps of {args.prompts} prompts x {args.group} completions of <= "
          f"{args.max_new_tokens} tokens ({data.name}):\n")
    print("| engine | s/step after the first | first step s | mean completion tokens | mean reward |")
    print("|---|---|---|---|---|")
    for engine in ("hf", "vllm"):
        if engine == "vllm":
            try:
                find_python()
            except Exception:  # noqa: BLE001
                continue
        run = run_grpo(build_config(tree(args, data, out, engine)), overwrite=True)
        records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "reward" in r]
        ends = [r["elapsed_s"] for r in steps]
        later = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else float("nan")
        print(f"| {engine} | {later:.1f} | {ends[0]:.1f} | "
              f"{sum(r['completion_tokens'] for r in steps) / len(steps):.1f} | "
              f"{sum(r['reward'] for r in steps) / len(steps):.3f} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--grpo-steps", type=int, default=4)
    parser.add_argument("--out", default="runs/rollouts-bench")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generation(args, out)
    if args.grpo_steps:
        grpo(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
