"""The GRPO family's variants learning one verifiable task on the embedded model, side by side.

    python bench/grpo_family.py [--losses grpo,dapo,gspo,rloo] [--steps 12] [--out runs/grpo-family]

The task: open the reply with the word "The", checked by a program (``opens_with_the`` below). It
is verifiable, the 135M model does it in about a third of its sampled replies before training (so
groups of 6 have reward variance to learn from), and LoRA learns it in a dozen steps on 2 CPU cores:
each variant takes about a minute. The same prompts, seed, LoRA and learning rate for every variant
(each otherwise with its paper's defaults, as `grpo.loss` sets them); prints the mean reward over
the first and last 3 steps of each, and the rise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tunesmith.config.load import build_config
from tunesmith.recipes.grpo import run_grpo

PROMPTS = ["Name a color.", "Name an animal.", "Pick a color for my new car.", "Name a fruit.", "Name a city.",
           "Say something about the sea."]


def opens_with_the(prompts: list, completions: list[str], answers: list) -> list[float]:
    """1.0 where the reply's first word is "The"."""
    return [float(text.split(maxsplit=1)[:1] == ["The"]) for text in completions]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--losses", default="grpo,dapo,gspo,rloo")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default="runs/grpo-family")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # so that "grpo_family:opens_with_the" imports
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "prompts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                     {"role": "assistant", "content": "x"}]}) + "\n"
                            for p in PROMPTS))
    rows = []
    for loss in args.losses.split(","):
        tree = {"name": loss, "task": "grpo", "model": {"name_or_path": "embedded", "device": "cpu"},
                "data": {"train": str(data), "max_seq_len": 64},
                "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
                "training": {"lr": 3e-3, "max_steps": args.steps, "batch_size": 2, "warmup_steps": 0,
                             "scheduler": "constant", "log_every": 1, "seed": 0},
                "grpo": {"loss": loss, "rewards": ["grpo_family:opens_with_the"], "group_size": 6,
                         "max_new_tokens": 6},
                "output": {"dir": str(out)}, "tracking": {"backends": []}}
        started = time.perf_counter()
        run = run_grpo(build_config(tree), overwrite=True)
        seconds = time.perf_counter() - started
        records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        rewards = [r["reward"] for r in records if "reward" in r]
        first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
        rows.append(f"| {loss} | {first:.3f} | {last:.3f} | {last - first:+.3f} | {seconds:.0f} |")
        print(f"{loss}: {first:.3f} -> {last:.3f} in {seconds:.0f} s", file=sys.stderr, flush=True)
    print(f"\nembedded model, LoRA r 8, 'opens with The' reward, {args.steps} steps of 2 prompts x 6 completions:\n")
    print("| loss | mean reward, first 3 steps | last 3 steps | rise | seconds |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
