"""Validation throughput on a generated 100,000-row JSONL file (OpenAI chat format).

    python bench/data_validate.py [--rows 100000] [--real ../shared/data/gsm8k_train.jsonl]

Prints rows/s (and tokens/s) for structural validation (no tokenizer) and for full validation with
the embedded tokenizer and chat template (lengths, trainable tokens after truncation), as `tunesmith
data validate FILE [--model embedded]` runs them. Rows are built from a fixed vocabulary with a
seed, in two shapes: "single" (one exchange, 5-25 word instruction, 10-90 word reply: about the
length of Alpaca rows) and "multi" (1-3 exchanges, optional system prompt, 20-120 word replies).
Tokenized validation is bounded by the tokenizer's own BPE speed, so tokens/s is the fairer figure.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from tunesmith.data.inspect import validate_file
from tunesmith.models.inference import tokenizer_for

WORDS = ("the model learns from data that people write about science history cooking travel code music "
         "health sport money language animals weather cities space books film art school work family").split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def write_rows(path: Path, count: int, shape: str = "multi", seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(count):
            if shape == "single":
                messages = [{"role": "user", "content": sentence(rng, 5, 25)},
                            {"role": "assistant", "content": sentence(rng, 10, 90)}]
            else:
                messages = [{"role": "system", "content": sentence(rng, 5, 15)}] if rng.random() < 0.3 else []
                for _ in range(rng.randint(1, 3)):
                    messages += [{"role": "user", "content": sentence(rng, 5, 40)},
                                 {"role": "assistant", "content": sentence(rng, 20, 120)}]
            handle.write(json.dumps({"messages": messages}) + "\n")


def _messages(row: dict) -> list[dict]:
    if "messages" in row:
        return row["messages"]
    return [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]


def measure(path: str, tokenizer) -> tuple[int, float, int]:
    started = time.perf_counter()
    report = validate_file(path, "auto", tokenizer, 1024)
    assert not report.errors, report.errors[:3]
    return report.rows, time.perf_counter() - started, report.trainable_tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--real", help="also measure a real file")
    args = parser.parse_args()
    tokenizer = tokenizer_for("embedded")
    with tempfile.TemporaryDirectory() as folder:
        files = []
        for shape in ("single", "multi"):
            files.append((f"generated {shape}-turn", Path(folder) / f"{shape}.jsonl"))
            write_rows(files[-1][1], args.rows, shape)
        files += [(Path(args.real).name, Path(args.real))] if args.real else []
        for label, path in files:
            rows, plain, _ = measure(str(path), None)
            _, tokenized, _ = measure(str(path), tokenizer)
            total = sum(len(tokenizer(tokenizer.apply_chat_template(_messages(json.loads(line)), tokenize=False),
                                      add_special_tokens=False)["input_ids"])
                        for line in path.read_text().splitlines()[:2000])
            mean = total / min(rows, 2000)
            print(f"{label}: {rows:,} rows of {mean:.0f} tokens on average | structure only: "
                  f"{rows / plain:,.0f} rows/s | with the embedded tokenizer: {rows / tokenized:,.0f} rows/s "
                  f"({rows * mean / tokenized:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
