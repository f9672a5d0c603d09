"""Helpers shared by tests: data files, config trees, metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def counting_rows(count: int = 24) -> list[dict]:
    """Chat rows of different lengths with a learnable pattern: 'count to n' -> '1 2 ... n'."""
    rows = []
    for index in range(count):
        n = 2 + index % 9
        rows.append({"messages": [{"role": "user", "content": f"Count to {n}."},
                                  {"role": "assistant", "content": " ".join(str(i) for i in range(1, n + 1))}]})
    return rows


def counting_pairs(count=24):
    """'Count to n': chosen counts up, rejected counts down."""
    rows = []
    for index in range(count):
        n = 2 + index % 9
        rows.append({"prompt": f"Count to {n}.", "chosen": " ".join(str(i) for i in range(1, n + 1)),
                     "rejected": " ".join(str(i) for i in range(n, 0, -1))})
    return rows


def tiny_tree(model_dir: Path, data: Path, out: Path, method: str = "lora", **training: Any) -> dict:
    """A config tree for a tiny CPU run; ``training`` entries override the training section."""
    return {
        "name": "tiny",
        "model": {"name_or_path": str(model_dir), "device": "cpu"},
        "data": {"train": str(data), "max_seq_len": 64},
        "method": {"type": method, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "training": {"lr": 5e-3, "max_steps": 30, "batch_size": 4, "warmup_steps": 0, "scheduler": "constant",
                     "log_every": 10, "seed": 0, **training},
        "output": {"dir": str(out)},
        # Tracking has its own tests (tests/train/test_tracking.py); the rest skip MLflow's store setup.
        "tracking": {"backends": []},
    }


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]



def text_length(prompts: list, completions: list[str], answers: list) -> list[float]:
    """A reward with variance on any model, random ones included: the completion's length / 40."""
    return [len(text) / 40 for text in completions]


def starts_with_the(prompts: list, completions: list[str], answers: list) -> list[float]:
    """A programmatic reward for GRPO tests: 1.0 where the completion's first word is "The". The
    embedded model opens about a third of its sampled replies so: a reward with variance to learn from."""
    return [float(text.split(maxsplit=1)[:1] == ["The"]) for text in completions]


def opens_with_word(prompts: list, completions: list[str], answers: list) -> list[float]:
    """1.0 where the reply opens with the word in $TUNESMITH_TEST_WORD, else 0.0: a test sets it to a word its
    tiny random model already opens with now and then, so that the reward is learnable in a few steps."""
    word = os.environ["TUNESMITH_TEST_WORD"]
    return [float(text.split(maxsplit=1)[:1] == [word]) for text in completions]


def flat_or_parity(prompts: list, completions: list[str], answers: list) -> list[float]:
    """A reward with no signal for some prompts: 0.5 whatever the reply where the user's message starts with
    "Flat", else the parity of the reply's length (1.0 for odd). A group of a "Flat" prompt always has
    zero variance: dynamic sampling must drop it."""
    flat = [str(prompt[-1]["content"]).startswith("Flat") for prompt in prompts]
    return [0.5 if f else float(len(text) % 2) for f, text in zip(flat, completions, strict=True)]


def run_under_triton_interpreter(script: str) -> None:
    """Run ``script`` in a fresh process with TRITON_INTERPRET=1 (read when a kernel is defined) and check it
    ended printing "kernel ok"; skips without triton."""
    import os
    import subprocess
    import sys

    import pytest

    pytest.importorskip("triton", reason="triton is in the test extra; install it with pip install -e '.[test]'")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernel ok" in done.stdout


class EchoEnvironment:
    """A multi-turn environment for tiny random models: the first turn starts with a complete call (prefill),
    the tool answers "echoed", and the reward is the last reply's length / 40 (variance on any model)."""

    tools = [{"type": "function", "function": {"name": "echo", "description": "echo",
                                               "parameters": {"type": "object", "properties": {}}}}]
    instructions = ""
    prefill = '<tool_call>\n{"name": "echo", "arguments": {}}\n</tool_call>'

    def start(self, row):
        return {}

    def step(self, state, calls):
        return ["echoed"] * len(calls)

    def reward(self, state, messages):
        return len(messages[-1]["content"]) / 40

    def metrics(self, state):
        return {"replies": 1.0}
