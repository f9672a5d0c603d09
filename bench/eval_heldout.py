"""Evaluate a finished SFT run against its base on the rows the run held out (data.eval_fraction).

    python bench/eval_heldout.py runs/quickstart [--metrics loss,perplexity,json_valid,exact_match,rougeL,bleu]

The held-out rows are chosen again as training chose them (the same seeded split of the same
file), written to RUN/heldout.jsonl, and passed to `tunesmith eval RUN --compare-base`. Runs whose
data set an explicit eval file do not need this: pass that file to `tunesmith eval` directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunesmith.cli.main import main as tunesmith  # noqa: E402
from tunesmith.data.build import DataReport, hold_out, read_canonical  # noqa: E402
from tunesmith.targets import resolve_target  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finished run folder (task sft) that held out data.eval_fraction")
    parser.add_argument("--metrics", default="loss,perplexity,json_valid,exact_match,rougeL,bleu")
    parser.add_argument("--max-new-tokens", default="96")
    args = parser.parse_args()
    config = resolve_target(args.run).config
    if config is None or config.data.eval or not config.data.eval_fraction:
        raise SystemExit(f"{args.run}: not a run that held out a fraction of its training data")
    if config.data.empty_labels == "drop":  # dropped rows would shift the split made here
        raise SystemExit(f"{args.run}: data.empty_labels: drop may have dropped rows before the split; the split "
                         "cannot be made again here")
    report = DataReport()
    rows = [r.row for d in config.data.train for r in read_canonical(d, report)]
    if report.errors:
        raise SystemExit("\n".join(report.errors))
    _, held = hold_out(rows, config.data.eval_fraction, config.training.seed)
    out = Path(args.run) / "heldout.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in held))
    print(f"{len(held)} held-out rows of {len(rows)} -> {out}")
    sys.exit(tunesmith(["eval", args.run, "--data", str(out), "--compare-base", "--metrics", args.metrics,
                        "--max-new-tokens", args.max_new_tokens]))


if __name__ == "__main__":
    main()
