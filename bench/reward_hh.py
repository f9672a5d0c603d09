"""Reward model on Anthropic HH (harmless) pairs: the embedded SmolLM2-135M + LoRA, one epoch on
1,500 pairs, pairwise accuracy on the held-out pairs after them (issue 5's measurement).

    python bench/reward_hh.py [--train 1500] [--eval 300] [--max-seq-len 192]

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
from tunesmith.recipes.dpo import run_pairs  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf_harmless_sample.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--eval", type=int, default=300)
    parser.add_argument("--max-seq-len", type=int, default=192)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "tunesmith-reward-hh")
    args = parser.parse_args()
    if not SAMPLE.is_file():
        raise SystemExit(f"{SAMPLE} not found (../shared/data)")
    report = DataReport()
    rows = [r.row for r in read_canonical(DatasetConfig(path=str(SAMPLE)), report)]
    print(f"{len(rows)} valid pairs, {len(report.errors)} faulty rows left out")
    args.out.mkdir(parents=True, exist_ok=True)
    train, held = rows[:args.train], rows[args.train:args.train + args.eval]
    if not held:
        raise SystemExit(f"no rows left for evaluation after {args.train} training pairs")
    for name, part in (("train", train), ("eval", held)):
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    config = build_config({
        "name": "reward-hh", "task": "reward",
        "data": {"train": str(args.out / "train.jsonl"), "eval": str(args.out / "eval.jsonl"),
                 "max_seq_len": args.max_seq_len},
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "training": {"lr": args.lr, "epochs": 1, "batch_size": args.batch, "warmup_ratio": 0.05,
                     "log_every": 10, "save_every": None},
        "output": {"dir": str(args.out / "runs")},
        **({"model": {"name_or_path": args.model}} if args.model else {}),
    })
    started = time.time()
    run = run_pairs(config, overwrite=True)
    metrics = run.result.final_eval_metrics
    print(f"reward model, {len(train)} HH pairs, 1 epoch, {time.time() - started:.0f} s: held-out pairwise "
          f"accuracy {metrics['eval_rewards/accuracy']:.3f} on {len(held)} pairs, mean margin "
          f"{metrics['eval_rewards/margin']:.3f}, eval loss {run.result.final_eval_loss:.4f}")


if __name__ == "__main__":
    main()
