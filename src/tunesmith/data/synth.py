"""Self-instruct style augmentation: new instruction/response rows from seed tasks.

A generator (the project's own generation with a local model, or any OpenAI-compatible
endpoint) is shown a few sampled tasks and asked for a new one. Replies are parsed, then
filtered: empty parts, over-long rows, and near-duplicates of the seeds or of rows already kept
(MinHash over word 3-grams) are dropped with a counted reason. Every kept row records its
origin: the generator, the seed tasks it was shown, the attempt number and the sampling settings.
"""

from __future__ import annotations

import json
import random
import re
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.readers import read_rows
from tunesmith.data.transform import _shingles
from tunesmith.errors import TunesmithError

Generate = Callable[[str], str]  # prompt -> reply


@dataclass(frozen=True)
class SeedTask:
    id: str
    instruction: str
    input: str
    output: str


def read_seed_tasks(path: str | Path) -> list[SeedTask]:
    """Self-instruct seed files (instruction + instances) or Alpaca rows."""
    tasks = []
    for raw in read_rows(path):
        row = raw.value
        if raw.error or not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise TunesmithError(f"{raw.where}: instruction: a seed task needs an instruction "
                                 f"({raw.error or 'field missing'})")
        instance = (row.get("instances") or [{}])[0] if "instances" in row else row
        tasks.append(SeedTask(str(row.get("id", raw.where)), row["instruction"], str(instance.get("input", "") or ""),
                              str(instance.get("output", "") or "")))
    return tasks


def build_prompt(examples: list[SeedTask]) -> str:
    parts = ["Here are some tasks, each with an instruction, an optional input and the correct output.\n"]
    for number, task in enumerate(examples, start=1):
        parts.append(f"Task {number}\nInstruction: {task.instruction}\nInput: {task.input or '<none>'}\n"
                     f"Output: {task.output}\n")
    parts.append(f"Write Task {len(examples) + 1}: a new, different task in exactly the same format "
                 "(Instruction:, Input:, Output:).")
    return "\n".join(parts)


_FIELD = re.compile(r"^\s*(Instruction|Input|Output)\s*:\s*", re.IGNORECASE | re.MULTILINE)
_NEXT_TASK = re.compile(r"\n\s*Task \d+\b.*", re.DOTALL)  # a model running on into another task


def parse_task(reply: str) -> dict[str, str]:
    """The instruction, input and output of a generated task ('' for a missing part).

    >>> parse_task("Task 4\\nInstruction: Add the numbers.\\nInput: 2, 3\\nOutput: 5\\n\\nTask 5: more")
    {'instruction': 'Add the numbers.', 'input': '2, 3', 'output': '5'}
    """
    found = {"instruction": "", "input": "", "output": ""}
    matches = list(_FIELD.finditer(reply))
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(reply)
        name = match.group(1).lower()
        if not found[name]:
            value = _NEXT_TASK.sub("", reply[match.end():end]).strip()
            found[name] = "" if value.lower() in ("<none>", "none", "n/a") and name == "input" else value
    return found


def endpoint_generator(url: str, model: str, temperature: float, max_tokens: int, api_key: str | None = None,
                       timeout: float = 120.0) -> Generate:
    """Any OpenAI-compatible server: POST {url}/v1/chat/completions (``url`` may already end in /v1)."""
    base = url.rstrip("/")
    target = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")

    def generate(prompt: str) -> str:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": temperature, "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        request = urllib.request.Request(target, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())["choices"][0]["message"]["content"] or ""
        except (urllib.error.URLError, KeyError, IndexError, json.JSONDecodeError) as err:
            raise TunesmithError(f"{target}: no usable chat completion ({err})") from None

    return generate


@dataclass
class SynthResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    attempts: int = 0
    stopped: str | None = None  # why generation stopped early; the rows kept so far are still written


def synthesize(seeds: list[SeedTask], generate: Generate, n: int, generator_name: str, *, examples: int = 3,
               near: float = 0.7, max_chars: int = 2000, max_attempts: int | None = None, seed: int = 0,
               sampling: dict[str, Any] | None = None) -> SynthResult:
    """Generate until ``n`` rows pass the filters or ``max_attempts`` (default 5 n) are spent."""
    from datasketch import MinHash, MinHashLSH

    def signature(text: str) -> MinHash:
        minhash = MinHash(num_perm=128, seed=1)
        minhash.update_batch(list(_shingles(text)))
        return minhash

    rng = random.Random(seed)
    index = MinHashLSH(threshold=near, num_perm=128, weights=(0.1, 0.9))
    kept: dict[str, MinHash] = {}
    for task in seeds:
        kept[f"seed:{task.id}"] = signature(f"{task.instruction} {task.input} {task.output}")
        index.insert(f"seed:{task.id}", kept[f"seed:{task.id}"])
    result = SynthResult()
    while len(result.rows) < n and result.attempts < (max_attempts or 5 * n):
        result.attempts += 1
        shown = rng.sample(seeds, min(examples, len(seeds)))
        try:
            task = parse_task(generate(build_prompt(shown)))
        except (TunesmithError, KeyboardInterrupt, TimeoutError, OSError) as err:
            result.stopped = f"stopped after {result.attempts - 1} attempts: {err or type(err).__name__}"
            break
        if not task["instruction"].strip() or not task["output"].strip():
            result.dropped["empty instruction or output"] += 1
            continue
        text = f"{task['instruction']} {task['input']} {task['output']}"
        if len(text) > max_chars:
            result.dropped["over-long"] += 1
            continue
        minhash = signature(text)
        # LSH candidates are confirmed by their estimated similarity: the bands over-report to miss little.
        similar = [key for key in index.query(minhash) if minhash.jaccard(kept[key]) >= near]
        if similar:
            kind = "seed" if any(str(key).startswith("seed:") for key in similar) else "generated row"
            result.dropped[f"near-duplicate of a {kind}"] += 1
            continue
        kept[f"row:{len(result.rows)}"] = minhash
        index.insert(f"row:{len(result.rows)}", minhash)
        result.rows.append({**task, "_origin": {"generator": generator_name, "seed_tasks": [t.id for t in shown],
                                                "attempt": result.attempts, **(sampling or {})}})
    return result
