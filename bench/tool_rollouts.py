"""Multi-turn tool rollouts: GRPO with the calculator environment on a small GSM8K subset, embedded model.

    python bench/tool_rollouts.py [--problems 16] [--steps 12] [--out runs/tool-rollouts]

The subset: the first ``--problems`` GSM8K training problems of ../shared/data whose worked solution takes
one calculator step (one ``<<...>>`` annotation) and whose question is under 200 characters. The
environment is ``tunesmith.environments:Calculator`` with ``prefill_call`` (the 135M model never calls a tool
on its own: 0 calls in 48 episodes with the instructions and a worked example) and ``tool_bonus`` 0.5, so
the reward is 1 for a right final answer plus 0.5 for an episode whose calculator call returned a value.
Prints, over the first and last 3 steps: the mean reward, the share of episodes with the right answer and
with a call that returned a value (the environment's metrics), and the tool calls and turns per episode (a
call counts when it is well formed, whether or not its expression evaluates).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tunesmith.config.load import build_config
from tunesmith.recipes.grpo import run_grpo

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def subset(count: int) -> list[dict]:
    rows = []
    with open(SHARED / "gsm8k_train.jsonl") as lines:
        for line in lines:
            row = json.loads(line)
            if row["answer"].count("<<") == 1 and len(row["question"]) < 200:
                rows.append({"messages": [{"role": "user", "content": row["question"]},
                                          {"role": "assistant", "content": row["answer"]}]})
            if len(rows) == count:
                break
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--group", type=int, default=6)
    parser.add_argument("--out", default="runs/tool-rollouts")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"{SHARED} is absent: this bench needs GSM8K from ../shared/data", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "gsm8k-one-step.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in subset(args.problems)))
    tree = {"name": "calculator", "task": "grpo", "model": {"name_or_path": "embedded", "device": "cpu"},
            "data": {"train": str(data), "max_seq_len": 640},
            "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
            "training": {"lr": 2e-3, "max_steps": args.steps, "batch_size": 2, "warmup_steps": 0,
                         "scheduler": "constant", "log_every": 1, "seed": 0},
            "grpo": {"environment": "tunesmith.environments:Calculator",
                     "environment_args": {"prefill_call": True, "tool_bonus": 0.5}, "max_turns": 3,
                     "group_size": args.group, "max_new_tokens": 48, "beta": 0.0},
            "output": {"dir": str(out)}, "tracking": {"backends": []}}
    started = time.perf_counter()
    run = run_grpo(build_config(tree), overwrite=True)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]

    def mean(key: str, part: list[dict]) -> float:
        return sum(r[key] for r in part) / len(part)

    first, last = steps[:3], steps[-3:]
    print(f"\nGRPO + calculator, embedded model, {len(steps)} steps of 2 GSM8K one-step problems x {args.group} "
          f"episodes (max 3 turns), {seconds:.0f} s:\n")
    print("| | first 3 steps | last 3 steps |")
    print("|---|---|---|")
    for key, label in (("reward", "mean reward"), ("env/correct", "right answer (share of episodes)"),
                       ("env/calculated", "a call returned a value (share)"), ("tool_calls", "tool calls per episode"),
                       ("turns", "turns per episode")):
        print(f"| {label} | {mean(key, first):.3f} | {mean(key, last):.3f} |")
    print("\nper step (reward / right answers / calls that returned a value):",
          " ".join(f"{r['reward']:.2f}/{r['env/correct']:.2f}/{r['env/calculated']:.2f}" for r in steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
