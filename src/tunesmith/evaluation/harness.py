"""`tunesmith eval TARGET --harness TASKS`: EleutherAI's lm-evaluation-harness on a run, a model or an
adapter (merged in memory), with its results in harness.json.

TASKS are lm-eval task or group names, YAML task files, or JSONL files of chat rows. A JSONL file
becomes a local generation task scored by tunesmith's own exact match (the same extraction and
normalisation as ``tunesmith eval --metrics exact_match``): no hub, so it works offline. A named
task whose data is not on this machine fails before the model loads, naming the task, the dataset
and the way out.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tunesmith import __version__
from tunesmith.errors import TunesmithError
from tunesmith.evaluation.metrics import extract
from tunesmith.evaluation.run import read_eval_rows
from tunesmith.io import write_text_atomic
from tunesmith.rundir import HARNESS_FILE

log = logging.getLogger(__name__)

# lm-eval loads a task's process_results from a Python file beside its YAML (``!function``).
_TASK_UTILS = '''"""Written by tunesmith: scores a local task with tunesmith's exact match."""
from tunesmith.evaluation.metrics import exact_match


def process_results(doc, results):
    return {"exact_match": exact_match(results[0], doc["target"], doc["extract"], doc["normalise"])}
'''


@dataclass
class HarnessOptions:
    tasks: list[str]
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 256
    chat_template: bool = False
    extract: str = "none"
    normalise: tuple[str, ...] = ("case", "punct", "articles", "whitespace")
    device: str = "auto"


def _task_name(path: Path) -> str:
    return "tunesmith_" + (re.sub(r"\W+", "_", path.stem).strip("_") or "task")


def _prompt_text(messages: list[dict[str, str]]) -> str:
    """The prompt turns as plain text (lm-eval applies the chat template itself when asked)."""
    return "\n\n".join(m["content"] for m in messages)


def local_task(rows_file: Path, folder: Path, options: HarnessOptions) -> str:
    """Write an lm-eval task for a JSONL file of chat rows into ``folder``; return its name.

    Each row's prompt turns are the input and its last assistant turn the target; rows are read
    (and rejected, naming file and line) as ``tunesmith eval --data`` reads them."""
    rows = read_eval_rows(rows_file)
    name = _task_name(rows_file)
    data = folder / f"{name}.jsonl"
    documents = [{"prompt": _prompt_text(r.prompt), "target": r.reference, "extract": options.extract,
                  "normalise": list(options.normalise), "where": r.where} for r in rows]
    bad = next((d["where"] for d in documents if options.extract == "number" and extract(d["target"], "number")
                is None), None)
    if bad is not None:
        raise TunesmithError(f"{bad}: --extract number, but the reference reply holds no number")
    write_text_atomic(data, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents))
    write_text_atomic(folder / "tunesmith_task_utils.py", _TASK_UTILS)
    task = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test", "output_type": "generate_until",
        "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
        "generation_kwargs": {"until": ["\n\n\n"], "max_gen_toks": options.max_new_tokens, "do_sample": False},
        "process_results": "!function tunesmith_task_utils.process_results",
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": str(rows_file)},
    }
    text = yaml.safe_dump(task, sort_keys=False).replace("'!function tunesmith_task_utils.process_results'",
                                                          "!function tunesmith_task_utils.process_results")
    write_text_atomic(folder / f"{name}.yaml", text)
    return name


def _offline_hint(task: str, err: BaseException) -> str | None:
    """A clear message for a task whose data would come from the Hugging Face Hub, else None."""
    text = f"{type(err).__name__}: {err}"
    if not re.search(r"OfflineMode|Couldn't reach|ConnectionError|LocalEntryNotFound|connect|resolve|"
                     r"DatasetNotFound|doesn't exist on the Hub", text, re.IGNORECASE):
        return None
    dataset = re.search(r"'([\w.-]+/[\w.-]+)'", str(err))
    where = f" ({dataset.group(1)})" if dataset else ""
    return (f"--harness {task}: its data{where} is on the Hugging Face Hub and cannot be fetched here ({text}). "
            f"Either run where the hub is reachable (lm-eval caches it, HF_DATASETS_CACHE), or evaluate local "
            f"rows: --harness ROWS.jsonl makes a task of a JSONL file (works offline)")


def load_tasks(options: HarnessOptions, folder: Path) -> tuple[Any, list[str]]:
    """(lm-eval's TaskManager, the task names): JSONL files become local tasks, YAML files are
    included; every task's data is loaded once here, so a missing one fails before the model loads."""
    from lm_eval.tasks import TaskManager

    names, include = [], []
    for spec in options.tasks:
        path = Path(spec).expanduser()
        if path.suffix == ".jsonl":
            names.append(local_task(path, folder, options))
            include.append(str(folder))
        elif path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise TunesmithError(f"--harness {spec}: no such task file")
            names.append(str(path.resolve()))  # lm-eval loads a task or group from its YAML path
        else:
            names.append(spec)
    local_only = all(Path(spec).suffix == ".jsonl" for spec in options.tasks)  # skips indexing ~15,000 tasks
    manager = TaskManager(include_path=sorted(set(include)) or None, include_defaults=not local_only)
    for name in names:
        try:
            manager.load([name])
        except KeyError as err:
            raise TunesmithError(f"--harness {name}: not an lm-eval task, group or tag (lm-eval tasks --list "
                                 f"lists them), nor a .jsonl or .yaml file") from err
        except Exception as err:
            hint = _offline_hint(name, err)
            if hint is None:
                raise
            raise TunesmithError(hint) from err
    return manager, names


def _model_for_harness(target: Any, device: str) -> tuple[Any, Any]:
    from tunesmith.models.inference import merged_for_scoring
    from tunesmith.targets import load_target

    model, tokenizer = load_target(target, device)
    return merged_for_scoring(model).eval(), tokenizer


def run_harness(target: Any, options: HarnessOptions, out: Path) -> dict[str, Any]:
    """Run the tasks; write ``out/harness.json`` (results, per-sample replies of local tasks, settings)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise TunesmithError("--harness needs EleutherAI's lm-evaluation-harness: pip install 'tunesmith[harness]' "
                             "(or pip install lm-eval)") from None
    out.mkdir(parents=True, exist_ok=True)
    manager, names = load_tasks(options, out)
    model, tokenizer = _model_for_harness(target, options.device)
    started = time.monotonic()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=options.num_fewshot,
                                      limit=options.limit, apply_chat_template=options.chat_template,
                                      log_samples=True, bootstrap_iters=1000)
    samples = {name: [{"prompt": s["doc"].get("prompt"), "target": s["target"], "reply": s["filtered_resps"][0],
                       "exact_match": s.get("exact_match")}
                      for s in results["samples"].get(name, [])]
               for name in names if name.startswith("tunesmith_")}
    document = {
        "tunesmith": __version__, "lm_eval": lm_eval.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": getattr(target, "spec", target), "tasks": names, "seconds": round(time.monotonic() - started, 1),
        "settings": {"num_fewshot": options.num_fewshot, "limit": options.limit, "batch_size": options.batch_size,
                     "chat_template": options.chat_template, "max_new_tokens": options.max_new_tokens,
                     "extract": options.extract},
        "results": json.loads(json.dumps(results["results"], default=str)),
        "n_samples": json.loads(json.dumps(results.get("n-samples", {}), default=str)),
        "samples": samples,
    }
    write_text_atomic(out / HARNESS_FILE, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return document


def harness_lines(document: dict[str, Any]) -> list[str]:
    """The results as a table: task, metric, value and standard error."""
    lines = [f"{'task':<32} {'metric':<28} {'value':>8} {'stderr':>8}"]
    for task, entries in document["results"].items():
        for key, value in entries.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, flt = key.split(",", 1)
            stderr = entries.get(f"{metric}_stderr,{flt}")
            shown = f"{stderr:>8.4f}" if isinstance(stderr, (int, float)) else f"{'':>8}"
            lines.append(f"{task:<32} {metric + ('' if flt == 'none' else f' ({flt})'):<28} {value:>8.4f} {shown}")
    return lines
