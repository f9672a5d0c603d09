"""Issue 18's two reproductions on the quickstart, as a user meets them (2 CPU cores, the embedded model):

    python bench/survive.py [--part preempt|diverge|all] [--signal-at 13]

preempt: `tunesmith train configs/quickstart.yaml` (save_every 100, so no periodic checkpoint) gets a
SIGTERM once step --signal-at is logged; prints the seconds from the signal to the exit, the exit code
and the checkpoint written, then resumes with --resume and compares the final adapter with an
uninterrupted run's (largest absolute difference) and the logged steps (each once?).

diverge: full fine-tuning with SGD at lr 1.0 and no clipping (the issue's run that used to save a
destroyed model as a success); prints each step's loss and what the default divergence policy did.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"


def tunesmith(*args: str) -> list[str]:
    return [sys.executable, "-m", "tunesmith", *args]


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def preempt(folder: Path, signal_at: int) -> None:
    common = ["training.save_every=100", "training.max_steps=40", "tracking.backends=[]"]
    run_dir = folder / "runs" / "quickstart"
    child = subprocess.Popen(tunesmith("train", str(CONFIG), f"output.dir={folder / 'runs'}", *common),
                             stderr=subprocess.PIPE, text=True)
    while child.poll() is None and not any(r.get("step", 0) >= signal_at and "loss" in r for r in records(run_dir)):
        time.sleep(0.05)
    sent = time.monotonic()
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate()
    latency = time.monotonic() - sent
    status = json.loads((run_dir / "status.json").read_text())
    print(f"SIGTERM after step {signal_at} was logged: exit code {child.returncode} after {latency:.1f} s; "
          f"status {status['status']} at step {status['step']}")
    print("  " + next((line for line in stderr.splitlines() if line.startswith("stopped:")), "(no stop line)"))
    started = time.monotonic()
    subprocess.run(tunesmith("-q", "train", str(CONFIG), f"output.dir={folder / 'runs'}", *common, "--resume"),
                   check=True)
    print(f"resumed to the end in {time.monotonic() - started:.0f} s")
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    print(f"steps logged: {len(steps)} of 40, each once: {steps == list(range(1, 41))}")
    subprocess.run(tunesmith("-q", "train", str(CONFIG), f"output.dir={folder / 'straight'}", *common), check=True)
    resumed = load_file(str(run_dir / "model" / "adapter_model.safetensors"))
    straight = load_file(str(folder / "straight" / "quickstart" / "model" / "adapter_model.safetensors"))
    worst = max(float((resumed[k] - straight[k]).abs().max()) for k in straight)
    print(f"resumed vs uninterrupted adapter: largest absolute difference {worst:.2e} over {len(straight)} tensors")


def diverge(folder: Path) -> None:
    args = ["method.type=full", "training.optimizer=sgd", "training.lr=1.0", "training.max_grad_norm=null",
            "training.max_steps=12", "training.warmup_steps=0", "training.scheduler=constant",
            "training.eval_every=null", "training.save_every=100", "tracking.backends=[]",
            f"output.dir={folder / 'runs'}"]
    done = subprocess.run(tunesmith("-q", "train", str(CONFIG), *args), capture_output=True, text=True)
    run_dir = folder / "runs" / "quickstart"
    print(f"full fine-tuning, SGD lr 1.0, no clipping: exit code {done.returncode}")
    for record in records(run_dir):
        if "loss" in record:
            print(f"  step {record['step']:>2}  loss {record['loss']:>12.4g}  grad norm {record['grad_norm']:>12.4g}"
                  f"  lr {record['lr']:.3g}{'  ' + record['diverged'] if 'diverged' in record else ''}")
        elif record.get("event"):
            print(f"  {record['event']} from step {record.get('from_step')} to step {record['step']} "
                  f"(lr x{record.get('lr_factor')}): {record.get('why')}")
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"status {summary['status']}: {summary.get('reason')}")
    print("  " + next((line for line in done.stderr.splitlines() if line.startswith("error:")), "(no error line)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["preempt", "diverge", "all"], default="all")
    parser.add_argument("--signal-at", type=int, default=13)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2))))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        if args.part in ("preempt", "all"):
            preempt(Path(folder) / "preempt", args.signal_at)
        if args.part in ("diverge", "all"):
            diverge(Path(folder) / "diverge")


if __name__ == "__main__":
    main()
