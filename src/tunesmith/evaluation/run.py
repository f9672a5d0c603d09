"""`tunesmith eval`: score a model on chat rows, optionally beside another model (A/B) or against a
baseline eval.json (drift), and write eval.json and an HTML report.

Each row's last assistant turn is the reference. Likelihood metrics score it under the model
(loss over the reference's tokens only, as training's eval loss); generation metrics compare it
with the model's greedy reply to the turns before it. Every metric is a statistic of the rows, so
the confidence intervals come from resampling rows, and an A/B comparison resamples the same rows
for both models (paired intervals of the difference).
"""

from __future__ import annotations

import gc
import html
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunesmith import __version__
from tunesmith.config.schema import DatasetConfig
from tunesmith.data.build import DataReport, read_canonical
from tunesmith.data.collate import collate_batch
from tunesmith.data.formats import CHAT_FORMATS
from tunesmith.data.tokenize import IGNORE_INDEX, UNLIMITED, TokenizedRow, tokenize_conversations
from tunesmith.errors import DataError, TunesmithError
from tunesmith.evaluation import metrics as m
from tunesmith.evaluation.judge import JudgeSettings, judge_rows
from tunesmith.io import sha256_of, write_text_atomic
from tunesmith.models.inference import Target
from tunesmith.rundir import EVAL_FILE, EVAL_REPORT

log = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    metrics: list[str]
    max_new_tokens: int = 256
    max_seq_len: int = 2048
    batch_size: int = 8
    extract: str = "none"  # exact match: none | number | a regex
    normalise: tuple[str, ...] = m.NORMALISATIONS
    pattern: str | None = None  # regex_match
    bootstrap: int = 1000
    seed: int = 0
    device: str = "auto"
    judge: JudgeSettings | None = None  # an LLM judge of the A/B generations

    @property
    def generates(self) -> bool:
        return self.judge is not None or any(name in m.GENERATION_METRICS for name in self.metrics)


@dataclass
class EvalRow:
    where: str  # file:line
    messages: list[dict[str, str]]  # the prompt turns and the reference reply last

    @property
    def prompt(self) -> list[dict[str, str]]:
        return self.messages[:-1]

    @property
    def reference(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class Side:
    """One model's outputs on the rows."""

    target: str
    nll: np.ndarray | None = None  # summed negative log-likelihood of each reference
    tokens: np.ndarray | None = None  # its token count
    predictions: list[str] | None = None
    per_row: dict[str, np.ndarray] = field(default_factory=dict)
    statistics: dict[str, m.Statistic] = field(default_factory=dict)
    seconds: float = 0.0


def read_eval_rows(path: Path, limit: int | None = None) -> list[EvalRow]:
    """Chat rows in any format tunesmith reads, each ending with the assistant's reference reply;
    every fault is reported (file, line, field) before any model loads."""
    if not path.is_file():
        raise DataError([f"{path}: no such file"], consequence="nothing was evaluated")
    report = DataReport()
    rows: list[EvalRow] = []
    for row in read_canonical(DatasetConfig(path=str(path)), report, CHAT_FORMATS):
        messages = row.row.get("messages")
        if not messages:
            report.add(row.file, row.line, "text", "eval needs chat rows (prompt turns and a reference reply), "
                       "not raw text")
        elif messages[-1]["role"] != "assistant" or len(messages) < 2:
            report.add(row.file, row.line, "messages", "the last turn must be the assistant's reference reply, "
                       "after at least one prompt turn")
        else:
            rows.append(EvalRow(row.where, messages))
        if limit is not None and len(rows) >= limit:
            break
    if report.errors:
        raise DataError(report.errors, report.warnings, consequence="nothing was evaluated")
    if not rows:
        raise DataError([f"{path}: no rows to evaluate"], consequence="nothing was evaluated")
    return rows


def _progress(what: str, done: int, total: int, started: float) -> None:
    elapsed = time.monotonic() - started
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate else math.inf
    log.info("%s: %d/%d rows, %.2f rows/s, ETA %s", what, done, total, rate,
             f"{eta:.0f} s" if math.isfinite(eta) else "?")


def reference_only(row: TokenizedRow, max_seq_len: int) -> TokenizedRow:
    """Labels on the last assistant reply only (earlier replies are context, not the reference), and
    the row cut from the left to ``max_seq_len`` so that the reference is kept."""
    labels = list(row.labels)
    end = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=-1) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    labels = [IGNORE_INDEX] * start + labels[start:]
    return TokenizedRow(row.input_ids[-max_seq_len:], labels[-max_seq_len:], len(row.input_ids))


def likelihoods(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[EvalRow],
                options: EvalOptions) -> tuple[np.ndarray, np.ndarray]:
    """(summed NLL of each reference reply, its token count): the last assistant turn's tokens only."""
    from tunesmith.losses.logprobs import sequence_logps
    from tunesmith.models.modes import evaluating

    tokenized = tokenize_conversations(tokenizer, [r.messages for r in rows], UNLIMITED)
    problems = [f"{row.where}: messages: {item}" for row, item in zip(rows, tokenized) if isinstance(item, ValueError)]
    if problems:
        raise DataError(problems, consequence="nothing was evaluated")
    tokenized = [reference_only(t, options.max_seq_len) for t in tokenized]
    device = next(model.parameters()).device
    nll, tokens = np.zeros(len(rows)), np.zeros(len(rows))
    started = time.monotonic()
    with evaluating(model):
        for start in range(0, len(rows), options.batch_size):
            items = tokenized[start:start + options.batch_size]
            batch = collate_batch([{"input_ids": t.input_ids, "labels": t.labels} for t in items],
                                  tokenizer.pad_token_id)
            sums, counts = sequence_logps(model, {k: v.to(device) for k, v in batch.items()}, chunked=False)
            nll[start:start + len(items)] = (-sums).double().cpu().numpy()
            tokens[start:start + len(items)] = counts.double().cpu().numpy()
            _progress("eval loss", start + len(items), len(rows), started)
    return nll, tokens


def generations(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[EvalRow],
                options: EvalOptions) -> list[str]:
    """Each row's greedy reply to its prompt turns, generated in left-padded batches of similar length."""
    from tunesmith.data.tokenize import encode_prompt
    from tunesmith.generate.sample import SamplingConfig, sample_batch

    prompts = [encode_prompt(tokenizer, r.prompt)[0].tolist() for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    replies: list[str] = [""] * len(rows)
    sampling = SamplingConfig(max_new_tokens=options.max_new_tokens, temperature=0.0)
    started = time.monotonic()
    for start in range(0, len(order), options.batch_size):
        chunk = order[start:start + options.batch_size]
        for index, ids in zip(chunk, sample_batch(model, tokenizer, [prompts[i] for i in chunk], sampling)):
            replies[index] = tokenizer.decode(ids, skip_special_tokens=True).strip()
        _progress("generation", start + len(chunk), len(rows), started)
    return replies


def add_statistics(side: Side, rows: list[EvalRow], options: EvalOptions) -> None:
    """Per-row values and the statistic of each metric for one model."""
    references = [r.reference for r in rows]
    predictions = side.predictions or []
    rouge = [name for name in options.metrics if name.startswith("rouge")]
    if rouge:
        side.per_row.update(m.rouge_rows(predictions, references, rouge))
    for name in options.metrics:
        if name in ("loss", "perplexity"):
            side.statistics[name] = m.loss_of(side.nll, side.tokens, exponentiate=name == "perplexity")
            side.per_row["loss"] = side.nll / np.maximum(side.tokens, 1)
            continue
        if name in ("bleu", "chrf"):
            side.statistics[name] = m.corpus_metric(name, predictions, references)
            continue
        if name == "exact_match":
            side.per_row[name] = np.array([m.exact_match(p, r, options.extract, options.normalise)
                                           for p, r in zip(predictions, references)])
        elif name == "json_valid":
            side.per_row[name] = np.array([m.json_valid(p) for p in predictions])
        elif name == "regex_match":
            side.per_row[name] = np.array([m.regex_match(p, options.pattern or "") for p in predictions])
        side.statistics[name] = m.mean_of(side.per_row[name])


def run_side(target: str | Target, rows: list[EvalRow], options: EvalOptions) -> Side:
    """Load ``target``, score the rows with it, and free it."""
    from tunesmith.models.inference import merged_for_scoring
    from tunesmith.targets import load_target, resolve_target

    started = time.monotonic()
    target = resolve_target(target)
    log.info("eval: loading %s", target.spec)
    model, tokenizer = load_target(target, options.device)
    model = merged_for_scoring(model)  # an adapter scores as it would merged, at the base's speed
    side = Side(target.spec)
    if "loss" in options.metrics or "perplexity" in options.metrics:
        side.nll, side.tokens = likelihoods(model, tokenizer, rows, options)
    if options.generates:
        side.predictions = generations(model, tokenizer, rows, options)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    add_statistics(side, rows, options)
    side.seconds = time.monotonic() - started
    return side


def _interval(values: tuple[float, float]) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values]


def summarise(side: Side, rows: int, options: EvalOptions) -> dict[str, dict[str, Any]]:
    everything = np.arange(rows)
    return {name: {"value": stat(everything), "ci95": _interval(m.bootstrap(stat, rows, options.bootstrap,
                                                                             options.seed))}
            for name, stat in side.statistics.items()}


def paired_deltas(side: Side, other: Side, rows: int, options: EvalOptions) -> dict[str, dict[str, Any]]:
    """``side`` minus ``other`` per metric, with the paired bootstrap interval; ``significant``
    where the interval excludes 0."""
    everything = np.arange(rows)
    deltas = {}
    for name, stat in side.statistics.items():
        low, high = m.bootstrap(stat, rows, options.bootstrap, options.seed, minus=other.statistics[name])
        deltas[name] = {"value": stat(everything) - other.statistics[name](everything), "ci95": _interval((low, high)),
                        "significant": bool(not math.isnan(low) and (low > 0 or high < 0))}
    return deltas


def drift(current: dict[str, dict[str, Any]], baseline: dict[str, Any], threshold: float) -> dict[str, dict[str, Any]]:
    """Metrics that moved from a baseline eval.json by more than ``threshold`` (relative); each with
    both intervals and whether the baseline value lies outside the new interval.

    >>> now = {"loss": {"value": 1.5, "ci95": [1.4, 1.6]}, "bleu": {"value": 20.0, "ci95": [18.0, 22.0]}}
    >>> old = {"metrics": {"loss": {"value": 1.0, "ci95": [0.9, 1.1]}, "bleu": {"value": 20.5, "ci95": [19, 22]}}}
    >>> {k: v["flagged"] for k, v in drift(now, old, 0.05).items()}
    {'loss': True, 'bleu': False}
    """
    moved = {}
    for name, entry in current.items():
        before = baseline.get("metrics", {}).get(name)
        if before is None:
            continue
        change = entry["value"] - before["value"]
        # From a baseline of 0 any change is flagged; its relative size is undefined (null in JSON).
        relative = change / abs(before["value"]) if before["value"] else (None if change else 0.0)
        low, high = entry["ci95"]
        outside = low is not None and not low <= before["value"] <= high
        moved[name] = {"baseline": before["value"], "baseline_ci95": before.get("ci95"), "value": entry["value"],
                       "ci95": entry["ci95"], "change": change, "relative_change": relative,
                       "flagged": relative is None or abs(relative) > threshold, "baseline_outside_ci": outside}
    return moved


def evaluate(target: str | Target, data: Path, options: EvalOptions, other: str | None = None,
             baseline: Path | None = None, threshold: float = 0.05, limit: int | None = None) -> dict[str, Any]:
    """The whole evaluation as the eval.json document (rows included)."""
    rows = read_eval_rows(data, limit)
    if options.pattern is None and "regex_match" in options.metrics:
        raise TunesmithError("metric regex_match needs --pattern")
    if options.judge is not None and other is None:
        raise TunesmithError("the LLM judge compares two models: add --compare OTHER or --compare-base")
    before = None
    if baseline is not None:  # read it before spending minutes on the model
        try:
            before = json.loads(Path(baseline).read_text())
        except (OSError, ValueError) as err:
            raise TunesmithError(f"--baseline {baseline}: not a readable eval.json ({err})") from None
    log.info("eval: %d rows from %s; metrics %s", len(rows), data, ", ".join(options.metrics))
    side = run_side(target, rows, options)
    document: dict[str, Any] = {
        "tunesmith": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": side.target,
        "data": {"path": str(data), "sha256": sha256_of(data), "rows": len(rows)},
        "settings": {"metrics": options.metrics, "max_new_tokens": options.max_new_tokens,
                     "max_seq_len": options.max_seq_len, "extract": options.extract,
                     "normalise": list(options.normalise), "pattern": options.pattern,
                     "bootstrap": options.bootstrap, "seed": options.seed, "decoding": "greedy"},
        "seconds": round(side.seconds, 1),
        "metrics": summarise(side, len(rows), options),
    }
    second = judged = None
    if other is not None:
        second = run_side(other, rows, options)
        document["compare"] = {"model": other, "seconds": round(second.seconds, 1),
                               "metrics": summarise(second, len(rows), options),
                               "delta": paired_deltas(side, second, len(rows), options)}
        if options.judge is not None:
            try:
                judged = judge_rows(options.judge, [r.prompt for r in rows], [r.reference for r in rows],
                                    side.predictions or [], second.predictions or [])
            except Exception as err:  # noqa: BLE001 - the endpoint's failure must not lose the evaluation
                log.error("the judge failed (%s); the rest of the evaluation is written without it", err)
                document["compare"]["judge_error"] = f"{type(err).__name__}: {err}"
        if judged is not None:
            win = m.mean_of(judged["scores"])
            document["compare"]["judge"] = {
                "model": options.judge.model, "url": options.judge.url,
                "win_rate": {"value": win(np.arange(len(rows))),
                             "ci95": _interval(m.bootstrap(win, len(rows), options.bootstrap, options.seed))},
                "position_consistency": judged["consistency"], "unparsed": judged["unparsed"],
                "scoring": "per row, the mean over both orders of 1 (the model's reply chosen), 0.5 (tie) or 0"}
    if before is not None:
        document["drift"] = {"baseline": str(baseline), "threshold": threshold,
                             "metrics": drift(document["metrics"], before, threshold)}
    document["rows"] = []
    for i, row in enumerate(rows):
        item: dict[str, Any] = {"where": row.where, "prompt": row.prompt, "reference": row.reference}
        for key, s in (("", side), ("compare_", second)):
            if s is None:
                continue
            if s.predictions is not None:
                item[f"{key}prediction"] = s.predictions[i]
            item[f"{key}scores"] = {name: float(values[i]) for name, values in s.per_row.items()}
        if judged is not None:
            item["judge"] = {"verdicts": judged["verdicts"][i], "score": float(judged["scores"][i])}
        document["rows"].append(item)
    return document


# ---------------------------------------------------------------- output


def _number(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def _relative(value: float | None) -> str:
    return "changed from 0" if value is None else f"{value:+.1%}"


def _ci(entry: dict[str, Any]) -> str:
    low, high = entry["ci95"]
    return f"{_number(entry['value'])} [{_number(low)}, {_number(high)}]"


def summary_lines(document: dict[str, Any]) -> list[str]:
    """The terminal summary: one line per metric (with the other model and the difference)."""
    compare, moved = document.get("compare"), document.get("drift", {}).get("metrics", {})
    header = f"{'metric':12} {document['model'][-28:]:>34}"
    if compare:
        header += f" {compare['model'][-28:]:>34} {'difference':>34}"
    lines = [f"{document['data']['rows']} rows of {document['data']['path']} (95% bootstrap intervals)", header]
    for name, entry in document["metrics"].items():
        line = f"{name:12} {_ci(entry):>34}"
        if compare:
            delta = compare["delta"][name]
            line += f" {_ci(compare['metrics'][name]):>34} {_ci(delta):>32}{' *' if delta['significant'] else '  '}"
        if name in moved and moved[name]["flagged"]:
            line += f"  DRIFT {_relative(moved[name]['relative_change'])} from {_number(moved[name]['baseline'])}"
        lines.append(line)
    if compare:
        lines.append("* the paired interval of the difference excludes 0")
    if compare and "judge" in compare:
        judge = compare["judge"]
        lines.append(f"judge {judge['model']}: win rate of {document['model']} over {compare['model']} "
                     f"{_ci(judge['win_rate'])}, position-consistent on {judge['position_consistency']:.0%} of rows, "
                     f"{judge['unparsed']} answers without a verdict")
    return lines


def _judge_html(compare: dict[str, Any] | None, model: str) -> str:
    if not compare or "judge" not in compare:
        return ""
    judge, e = compare["judge"], html.escape
    return (f"<p>LLM judge <code>{e(judge['model'])}</code>: win rate of {e(model)} over {e(compare['model'])} "
            f"<b>{e(_ci(judge['win_rate']))}</b> (each row judged in both orders; position-consistent on "
            f"{judge['position_consistency']:.0%} of rows; {judge['unparsed']} answers without a verdict).</p>")


def report_html(document: dict[str, Any]) -> str:
    """A self-contained page: the metric table (with the other model, the difference and drift) and
    the generations, side by side in an A/B comparison."""
    e = html.escape
    compare = document.get("compare")
    moved = document.get("drift", {}).get("metrics", {})
    heads = ["metric", e(document["model"])] + ([e(compare["model"]), "difference (paired 95% CI)"] if compare else [])
    heads += ["baseline", "change"] if moved else []
    table = ["<tr>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr>"]
    for name, entry in document["metrics"].items():
        cells = [e(name), e(_ci(entry))]
        if compare:
            delta = compare["delta"][name]
            cells += [e(_ci(compare["metrics"][name])),
                      f"<span class='{'sig' if delta['significant'] else ''}'>{e(_ci(delta))}</span>"]
        if moved:
            drift_entry = moved.get(name)
            cells += ([e(_number(drift_entry["baseline"])),
                       f"<span class='{'sig' if drift_entry['flagged'] else ''}'>"
                       f"{_relative(drift_entry['relative_change'])}</span>"] if drift_entry else ["–", "–"])
        table.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    samples = []
    for row in document["rows"]:
        prompt = "\n\n".join(f"{t['role']}: {t['content']}" for t in row["prompt"])
        cells = [f"<td class='where'>{e(row['where'])}</td>", f"<td><pre>{e(prompt)}</pre></td>",
                 f"<td><pre>{e(row['reference'])}</pre></td>"]
        for key in ("", "compare_") if compare else ("",):
            if f"{key}prediction" in row:
                scores = ", ".join(f"{k} {_number(v)}" for k, v in row[f"{key}scores"].items())
                cells.append(f"<td><pre>{e(row[f'{key}prediction'])}</pre><div class='scores'>{e(scores)}</div></td>")
        samples.append("<tr>" + "".join(cells) + "</tr>")
    sample_heads = ["row", "prompt", "reference", e(document["model"])] + ([e(compare["model"])] if compare else [])
    settings = e(json.dumps(document["settings"]))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>tunesmith eval</title><style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:120em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;vertical-align:top;text-align:left}}pre{{white-space:pre-wrap;margin:0;
max-width:40em}}.sig{{font-weight:bold;color:#b00}}.scores,.where{{color:#666;font-size:.85em}}
</style></head><body><h1>Evaluation of {e(document['model'])}</h1>
<p>{document['data']['rows']} rows of <code>{e(document['data']['path'])}</code> (sha256
{e(document['data']['sha256'][:16])}…); greedy decoding; 95% bootstrap intervals over rows
({document['settings']['bootstrap']} resamples){'; the difference is paired (the same resampled rows for both)' if compare else ''}.
Settings: <code>{settings}</code></p>
<table>{''.join(table)}</table>{_judge_html(compare, document['model'])}
<h2>Generations</h2><table><tr>{''.join(f'<th>{h}</th>' for h in sample_heads)}</tr>{''.join(samples)}</table>
</body></html>
"""


def _finite(value: Any) -> Any:
    """NaN and infinities as null: json.dumps would write NaN/Infinity, which strict parsers refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_outputs(document: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    document = _finite(document)
    write_text_atomic(out / EVAL_FILE, json.dumps(document, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    write_text_atomic(out / EVAL_REPORT, report_html(document))
    return out / EVAL_FILE, out / EVAL_REPORT
