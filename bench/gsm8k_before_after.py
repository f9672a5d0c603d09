"""GSM8K before and after a short SFT: the embedded model against its LoRA fine-tune on held-out problems.

    python bench/gsm8k_before_after.py [--train 800] [--heldout 100] [--steps 80]

The last ``--heldout`` rows of ../shared/data/gsm8k_train.jsonl are held out (never trained on);
the first ``--train`` rows train a LoRA (r16, every linear layer) for ``--steps`` steps. Then
`tunesmith eval RUN --compare-base` scores both on the held-out rows: loss and perplexity of the
reference solutions, and exact match of the final number (GSM8K's ``#### n``; in a reply without
one, its last number). The files go to runs/gsm8k-data/; the run to runs/gsm8k/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunesmith.cli.main import main as tunesmith  # noqa: E402

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=800, help="rows trained on (from the start of the file)")
    parser.add_argument("--heldout", type=int, default=100, help="rows evaluated (from the end of the file)")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", default="256")
    parser.add_argument("--out", default="runs")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the finished runs/gsm8k again")
    args = parser.parse_args()
    if not SOURCE.is_file():
        raise SystemExit(f"{SOURCE} not found: this benchmark needs the shared data folder beside the project")
    lines = [line for line in SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.train + args.heldout > len(lines):
        raise SystemExit(f"--train {args.train} + --heldout {args.heldout} exceeds the file's {len(lines)} rows")
    folder = Path(args.out) / "gsm8k-data"
    folder.mkdir(parents=True, exist_ok=True)
    train_file, heldout_file = folder / "train.jsonl", folder / "heldout.jsonl"
    train_file.write_text("\n".join(lines[:args.train]) + "\n", encoding="utf-8")
    heldout_file.write_text("\n".join(lines[-args.heldout:]) + "\n", encoding="utf-8")
    config = {
        "name": "gsm8k", "model": {"name_or_path": "embedded"},
        "data": {"train": str(train_file.resolve()), "max_seq_len": 384},
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}},
        "training": {"lr": 5.0e-4, "scheduler": "cosine", "warmup_steps": 5, "max_steps": args.steps,
                     "batch_size": args.batch_size, "grad_accum": 1, "log_every": 10, "seed": 0},
        "output": {"dir": args.out},
    }
    config_file = folder / "gsm8k.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    print(f"train {args.train} rows -> {train_file}; held out {args.heldout} rows -> {heldout_file}", flush=True)
    status = 0 if args.eval_only else tunesmith(["train", str(config_file), "--overwrite"])
    if status:
        sys.exit(status)
    sys.exit(tunesmith(["eval", str(Path(args.out) / "gsm8k"), "--data", str(heldout_file), "--compare-base",
                        "--metrics", "loss,perplexity,exact_match", "--extract", "number",
                        "--max-new-tokens", args.max_new_tokens, "--batch-size", "16"]))


if __name__ == "__main__":
    main()
