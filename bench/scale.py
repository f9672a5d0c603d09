"""Tokens per second of the quickstart (the embedded SmolLM2-135M, LoRA) on one process and on two (DDP,
gloo on CPU), at the same global batch (16 rows a step):

    python bench/scale.py [--steps 12] [--skip 2]

Prints the mean tokens/s of the steps after the first --skip (warm-up), for 1 process x 1 thread, 1 process x
2 threads and 2 processes x 1 thread each, and the scaling efficiency: two processes' tokens/s over twice one
process's (1.0 is perfect). On a machine with GPUs the same two commands it runs, with `--nproc` set to the
GPU count, give the multi-GPU figure (docs: More than one GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"


def tokens_per_s(run_dir: Path, skip: int) -> tuple[float, int]:
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "tokens_per_s" in r][skip:]
    return sum(r["tokens"] for r in steps) / sum(r["tokens"] / r["tokens_per_s"] for r in steps), len(steps)


def run(folder: Path, name: str, threads: int, processes: int, steps: int) -> Path:
    overrides = [f"output.dir={folder}", f"name={name}", f"training.max_steps={steps}", "training.eval_every=null",
                 "training.save_every=null", "tracking.backends=[]", "data.eval_fraction=0",
                 f"training.grad_accum={2 // processes}"]
    command = [sys.executable, "-m", "tunesmith", "-q", "train", str(CONFIG), *overrides]
    if processes > 1:
        command += ["--nproc", str(processes)]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return folder / name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, threads, processes in (("p1t1", 1, 1), ("p1t2", 2, 1), ("p2t1", 1, 2)):
            results[name] = tokens_per_s(run(Path(folder), name, threads, processes, args.steps), args.skip)
    for name, label in (("p1t1", "1 process x 1 thread"), ("p1t2", "1 process x 2 threads"),
                        ("p2t1", "2 processes x 1 thread (DDP, gloo)")):
        value, counted = results[name]
        print(f"{label:<36} {value:8.0f} tokens/s  (mean of {counted} steps of 16 rows)")
    efficiency = results["p2t1"][0] / (2 * results["p1t1"][0])
    print(f"scaling efficiency, 2 processes vs 1 (1 thread each): {efficiency:.2f}")
    print(f"2 processes vs 1 process with both cores: {results['p2t1'][0] / results['p1t2'][0]:.2f}x")


if __name__ == "__main__":
    main()
