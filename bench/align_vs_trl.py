"""DPO and GRPO speed and memory: tunesmith against TRL's DPOTrainer and GRPOTrainer on the same
model, data and settings, the ratio printed in the same run.

    pip install -e '.[bench]'          # TRL, a benchmark-only extra
    python bench/align_vs_trl.py [--task dpo|grpo|both] [--warmup 2] [--steps 6]

Both sides train the embedded SmolLM2-135M (float32 on CPU) with LoRA r 16, alpha 32, dropout 0 on
every linear layer, AdamW at the same learning rate, no gradient checkpointing (TRL turns it on by
default; ``--gradient-checkpointing`` turns it on for both) and the same rows:

- DPO: the first valid Anthropic HH pairs of ../shared/data (the prompt as chat messages, the two
  replies), ``--batch`` pairs a step, at most ``--max-seq-len`` tokens (both cut the prompt's start),
  β 0.1, the reference being the model with its adapters off.
- GRPO: GSM8K questions, ``--prompts`` a step with ``--group`` completions each of at most
  ``--max-new-tokens`` tokens sampled at temperature 1, rewarded by tunesmith.rewards' gsm8k_exact
  and gsm8k_format (the same functions on both sides), β 0.04, ε 0.2, TRL's ``loss_type: grpo``
  (each completion's tokens averaged, as tunesmith does). Sampling differs between the two, so
  completions differ in length: the mean completion length is printed beside the speed.

Each side runs in its own forked child: steps/s is timed from the end of step ``--warmup`` to the
end of the last step, and the peak memory is the child's peak RSS (CUDA: max allocated), which
includes loading the model and preparing the data, and what the parent held when it forked (torch,
transformers and tunesmith imported: the parent's peak is printed; the same for both sides).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from forked import run_forked  # noqa: E402  (bench/ is on sys.path when a script there runs)

from tunesmith.config.load import build_config  # noqa: E402
from tunesmith.config.schema import DatasetConfig  # noqa: E402
from tunesmith.data.build import DataReport, read_canonical  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HH = SHARED / "hh_rlhf_harmless_sample.jsonl.gz"
GSM8K = SHARED / "gsm8k_train.jsonl"
REWARDS = ["tunesmith.rewards:gsm8k_exact", "tunesmith.rewards:gsm8k_format"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def steps_per_s(ends: list[float], warmup: int) -> float:
    """Steps per second from the end of step ``warmup`` (1-based) to the end of the last step."""
    return (len(ends) - warmup) / (ends[-1] - ends[warmup - 1])


def max_seq_len(args: argparse.Namespace, task: str) -> int:
    return args.max_seq_len if task == "dpo" else 512


def cuda_peak() -> dict:
    import torch
    if not torch.cuda.is_available():
        return {}
    return {"cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


# ---------------------------------------------------------------- tunesmith


def tunesmith_run(args: argparse.Namespace, task: str, data: Path, out: Path) -> dict:
    from tunesmith.recipes.dpo import run_dpo
    from tunesmith.recipes.grpo import run_grpo
    section = ({"preference": {"loss": "dpo", "beta": 0.1}} if task == "dpo" else
               {"grpo": {"rewards": REWARDS, "group_size": args.group, "max_new_tokens": args.max_new_tokens,
                         "beta": 0.04, "epsilon": 0.2, "temperature": 1.0}})
    config = build_config({
        "name": f"{task}-vs-trl", "task": task,
        "data": {"train": str(data), "eval_fraction": 0.0, "max_seq_len": max_seq_len(args, task)},
        "method": {"type": "lora", "lora": LORA},
        "training": {"lr": args.lr, "max_steps": args.warmup + args.steps, "seed": 0,
                     "batch_size": args.batch if task == "dpo" else args.prompts,
                     "gradient_checkpointing": args.gradient_checkpointing, "log_every": 1, "save_every": None},
        "output": {"dir": str(out)}, **section,
    })
    run = (run_dpo if task == "dpo" else run_grpo)(config, overwrite=True)
    steps = [row for row in map(json.loads, (run.run_dir / "metrics.jsonl").read_text().splitlines())
             if "loss" in row]
    result = {"steps_per_s": steps_per_s([row["elapsed_s"] for row in steps], args.warmup)}
    if task == "grpo":
        measured = steps[args.warmup:]
        result["completion_tokens"] = sum(row["completion_tokens"] for row in measured) / len(measured)
        result["reward"] = sum(row["reward"] for row in measured) / len(measured)
    return {**result, **cuda_peak()}


# ---------------------------------------------------------------- TRL


def trl_run(args: argparse.Namespace, task: str, rows: list[dict], out: Path) -> dict:
    import datasets
    import torch
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from tunesmith.models.load import prepare_embedded
    from tunesmith.rewards import load_reward

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.logs: list[dict] = []

        def on_step_end(self, _args, _state, _control, **_kwargs) -> None:
            self.ends.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **_kwargs) -> None:
            self.logs.append(dict(logs or {}))

    folder = prepare_embedded()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    common = {"output_dir": str(out), "learning_rate": args.lr, "max_steps": args.warmup + args.steps, "seed": 0,
              "logging_steps": 1, "save_strategy": "no", "report_to": "none", "bf16": False,
              "use_cpu": not torch.cuda.is_available(), "gradient_checkpointing": args.gradient_checkpointing,
              "dataloader_num_workers": 0}
    clock = Clock()
    if task == "dpo":
        dataset = datasets.Dataset.from_list([
            {"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
        config = trl.DPOConfig(per_device_train_batch_size=args.batch, max_length=max_seq_len(args, task),
                               truncation_mode="keep_end", beta=0.1, **common)
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=lora, callbacks=[clock])
    else:
        def for_trl(name: str):
            """TRL hands rewards the dataset's columns as keywords and chat completions as messages."""
            function = load_reward(name)

            def reward(prompts, completions, answer, **_kwargs):
                texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
                return function(prompts, texts, answer)
            reward.__name__ = name.rsplit(":", 1)[-1]
            return reward

        dataset = datasets.Dataset.from_list([
            {"prompt": r["messages"][:-1], "answer": r["messages"][-1]["content"]} for r in rows])
        config = trl.GRPOConfig(per_device_train_batch_size=args.prompts * args.group, num_generations=args.group,
                                max_completion_length=args.max_new_tokens, temperature=1.0, beta=0.04,
                                epsilon=0.2, loss_type="grpo", **common)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=[for_trl(name) for name in REWARDS], args=config,
                                  train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
                                  callbacks=[clock])
    trainer.train()
    result = {"steps_per_s": steps_per_s(clock.ends, args.warmup), "trl": trl.__version__}
    if task == "grpo":
        logged = [log for log in clock.logs if "completions/mean_length" in log][args.warmup:]
        result["completion_tokens"] = sum(log["completions/mean_length"] for log in logged) / len(logged)
        result["reward"] = sum(log["reward"] for log in logged) / len(logged)
    return {**result, **cuda_peak()}


# ---------------------------------------------------------------- driver


def task_rows(args: argparse.Namespace, task: str) -> list[dict]:
    """The canonical rows both sides train on: exactly enough for the steps, in file order."""
    source = HH if task == "dpo" else GSM8K
    if not source.is_file():
        raise SystemExit(f"{source} not found (../shared/data)")
    needed = (args.warmup + args.steps) * (args.batch if task == "dpo" else args.prompts)
    rows = []
    for row in read_canonical(DatasetConfig(path=str(source)), DataReport()):
        rows.append(row.row)
        if len(rows) == needed:
            return rows
    raise SystemExit(f"{source} has fewer than {needed} valid rows")


def compare(args: argparse.Namespace, task: str) -> list[dict]:
    rows = task_rows(args, task)
    data = args.out / f"{task}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = []
    for side, work in (("tunesmith", lambda: tunesmith_run(args, task, data, args.out / "tunesmith")),
                       ("trl", lambda: trl_run(args, task, rows, args.out / "trl"))):
        print(f"{task}: {side} ...", flush=True)
        result = run_forked(work)
        if "error" in result:
            raise SystemExit(f"{task} on {side} failed: {result['error']}")
        results.append({"task": task, "side": side, **result})
    return results


def report(results: list[dict]) -> None:
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # it forks each side, then only waits
    print(f"\nparent process: peak {parent:.0f} MB of RSS, inherited by each side and counted in its peak")
    print(f"\n{'task':5} {'side':16} {'steps/s':>8} {'s/step':>7} {'peak MB':>8}  completion tokens, reward")
    for r in results:
        memory = r.get("cuda_peak_mb", r["peak_rss_mb"])
        side = f"trl {r['trl']}" if r["side"] == "trl" else r["side"]
        extra = f"  {r['completion_tokens']:.1f}, {r['reward']:.3f}" if "completion_tokens" in r else ""
        print(f"{r['task']:5} {side:16} {r['steps_per_s']:8.4f} {1 / r['steps_per_s']:7.2f} {memory:8.0f}{extra}")
    for task in dict.fromkeys(r["task"] for r in results):
        ours, theirs = (next(r for r in results if r["task"] == task and r["side"] == s) for s in ("tunesmith", "trl"))
        memory = "cuda_peak_mb" if "cuda_peak_mb" in ours else "peak_rss_mb"
        print(f"{task}: tunesmith/TRL steps/s {ours['steps_per_s'] / theirs['steps_per_s']:.2f}x, "
              f"peak memory {ours[memory] / theirs[memory]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["dpo", "grpo", "both"], default="both")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing starts")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--batch", type=int, default=4, help="DPO: pairs per step")
    parser.add_argument("--prompts", type=int, default=2, help="GRPO: prompts per step")
    parser.add_argument("--group", type=int, default=4, help="GRPO: completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=192, help="DPO: tokens per sequence (GRPO: prompt + completion within 512)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "tunesmith-vs-trl")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if importlib.util.find_spec("trl") is None:  # not imported here: the forked children would inherit it
        raise SystemExit("TRL is not installed: pip install -e '.[bench]'")
    results = []
    for task in (["dpo", "grpo"] if args.task == "both" else [args.task]):
        results += compare(args, task)
    report(results)


if __name__ == "__main__":
    main()
