"""Reward model or DPO on Anthropic HH (harmless) pairs: the embedded SmolLM2-135M + LoRA, one epoch
on 1,500 pairs, pairwise accuracy on the held-out pairs after them (issue 5's measurements).

    python bench/align_hh.py [--task reward|dpo] [--train 1500] [--eval 300] [--eval-from N] [--max-seq-len 192]

A reward run is then scored on the held-out pairs by `tunesmith reward score` (the command a user
runs), whose summary line is printed last: the number the docs quote.

For DPO the accuracy is that of the implicit rewards β·log(π/π_ref), and the chosen-minus-rejected
margin is printed as it moved during training (mean of the first and last tenth of the steps).

The sample holds 10 faulty rows (tunesmith names them: an empty reply, two assistant turns in a
row, transcripts that differ before the last turn); they are left out, the rest are written as
preference rows, the first --train for training and up to --eval of the rows after them for
evaluation (the sample has 1,790 valid pairs, so 1,500 leave 290).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunesmith.config.load import build_config  # noqa: E402
from tunesmith.config.schema import DatasetConfig  # noqa: E402
from tunesmith.data.build import DataReport, read_canonical  # noqa: E402
from tunesmith.cli.train import recipe_for  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf_harmless_sample.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["reward", "dpo"], default="reward")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations")
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--eval", type=int, default=300)
    parser.add_argument("--eval-from", type=int, default=None, help="first held-out pair (default: right after "
                        "the training pairs; 1500 keeps the docs' 290 held-out pairs with fewer training pairs)")
    parser.add_argument("--max-seq-len", type=int, default=192)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "tunesmith-align-hh")
    args = parser.parse_args()
    if not SAMPLE.is_file():
        raise SystemExit(f"{SAMPLE} not found (../shared/data)")
    report = DataReport()
    rows = [r.row for r in read_canonical(DatasetConfig(path=str(SAMPLE)), report)]
    print(f"{len(rows)} valid pairs, {len(report.errors)} faulty rows left out")
    args.out.mkdir(parents=True, exist_ok=True)
    start = args.train if args.eval_from is None else max(args.eval_from, args.train)
    train, held = rows[:args.train], rows[start:start + args.eval]
    if not held:
        raise SystemExit(f"no rows left for evaluation after {args.train} training pairs")
    for name, part in (("train", train), ("eval", held)):
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    config = build_config({
        "name": f"{args.task}-hh", "task": args.task,
        "data": {"train": str(args.out / "train.jsonl"), "eval": str(args.out / "eval.jsonl"),
                 "max_seq_len": args.max_seq_len},
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "training": {"lr": args.lr, "epochs": 1, "batch_size": args.batch, "warmup_ratio": 0.05,
                     "log_every": 10, "save_every": None, "eval_every": args.eval_every},
        **({"preference": {"loss": "dpo", "beta": args.beta}} if args.task == "dpo" else {}),
        "output": {"dir": str(args.out / "runs")},
        **({"model": {"name_or_path": args.model}} if args.model else {}),
    })
    started = time.time()
    run = recipe_for(config.task)(config, overwrite=True)
    metrics = run.result.final_eval_metrics
    steps = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    margins = [s["rewards/margin"] for s in steps if "rewards/margin" in s]
    tenth = max(1, len(margins) // 10)
    print(f"{args.task}: train margin {sum(margins[:tenth]) / tenth:.3f} (first tenth of steps) -> "
          f"{sum(margins[-tenth:]) / tenth:.3f} (last tenth)")
    for s in steps:
        if "eval_rewards/accuracy" in s:
            print(f"  step {s['step']}: held-out accuracy {s['eval_rewards/accuracy']:.3f}, "
                  f"margin {s['eval_rewards/margin']:.3f}")
    print(f"{args.task}, {len(train)} HH pairs, 1 epoch, lr {args.lr}, max_seq_len {args.max_seq_len}, "
          f"{time.time() - started:.0f} s: held-out pairwise "
          f"accuracy {metrics['eval_rewards/accuracy']:.3f} on {len(held)} pairs, mean margin "
          f"{metrics['eval_rewards/margin']:.3f}, eval loss {run.result.final_eval_loss:.4f}")
    if args.task == "reward":
        import subprocess

        command = [sys.executable, "-m", "tunesmith", "-q", "reward", "score", str(run.run_dir), "--file",
                   str(args.out / "eval.jsonl"), "--out", str(args.out / "scores.jsonl")]
        print("$ tunesmith " + " ".join(command[4:]), flush=True)
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
