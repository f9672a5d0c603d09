"""Distil a fine-tuned run into a fresh LoRA on its base, and measure the held-out divergence to the teacher.

    python bench/distill.py [--teacher runs/quickstart] [--data examples/data/quickstart.jsonl] [--steps 40]
                            [--loss forward_kl] [--top-k 0] [--on-policy 0]

The student is the embedded model with a new LoRA; the teacher, a run of it (by default the quickstart
LoRA, `tunesmith train configs/quickstart.yaml` first). 10% of the rows are held out. Prints the mean
divergence per reply token from student to teacher on the held-out rows before training (the base
model: the new LoRA starts at zero) and after, with the run's time.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from tunesmith.config.load import build_config
from tunesmith.recipes.base import build_training_data, eval_batches_of
from tunesmith.recipes.distill import DistillObjective, collate_with_prompts, load_teacher, run_distill
from tunesmith.targets import load_target


def held_out(config, student, teacher, tokenizer) -> float:
    _, rows, _ = build_training_data(config, tokenizer)
    batches = eval_batches_of(rows, 4, lambda r: collate_with_prompts(r, tokenizer.pad_token_id))
    objective = DistillObjective(config.distill, teacher, tokenizer)
    student.eval()
    with torch.no_grad():
        total = sum(float(objective.loss_sum(student, b)) for b in batches)
    return total / sum(objective.units(b) for b in batches)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default="runs/quickstart")
    parser.add_argument("--data", default="examples/data/quickstart.jsonl")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--loss", default="forward_kl")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--on-policy", type=float, default=0.0)
    parser.add_argument("--out", default="runs")
    args = parser.parse_args()
    tree = {"name": f"distill-{args.loss}", "task": "distill", "model": {"name_or_path": "embedded", "device": "cpu"},
            "data": {"train": args.data, "max_seq_len": 256, "eval_fraction": 0.1},
            "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
            "training": {"lr": 3e-4, "max_steps": args.steps, "batch_size": 4, "warmup_steps": 0,
                         "scheduler": "constant", "log_every": 5, "seed": 0},
            "distill": {"teacher": args.teacher, "loss": args.loss, "top_k": args.top_k, "on_policy": args.on_policy,
                        "max_new_tokens": 48},
            "output": {"dir": args.out}, "tracking": {"backends": []}}
    config = build_config(tree)
    student, tokenizer = load_target("embedded", "cpu")
    teacher = load_teacher(config, tokenizer, torch.device("cpu"))
    before = held_out(config, student, teacher, tokenizer)
    started = time.perf_counter()
    run = run_distill(config, overwrite=True)
    seconds = time.perf_counter() - started
    trained, _ = load_target(str(run.run_dir), "cpu")
    after = held_out(config, trained, teacher, tokenizer)
    print(f"\nstudent: embedded + a new LoRA r 16; teacher: {args.teacher}; {args.loss}"
          f"{f', top {args.top_k}' if args.top_k else ''}{f', on-policy {args.on_policy}' if args.on_policy else ''}; "
          f"{args.steps} steps of 4 rows in {seconds:.0f} s")
    print(f"held-out divergence per reply token: {before:.4f} before, {after:.4f} after ({after / before:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
