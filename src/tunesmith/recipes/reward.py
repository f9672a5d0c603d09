"""Score rows with a trained reward model: `tunesmith reward score RUN --file F`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunesmith.config.load import read_yaml
from tunesmith.config.schema import Config, DatasetConfig, ModelConfig
from tunesmith.data.build import DataReport, read_canonical
from tunesmith.data.collate import collate_batch
from tunesmith.data.preference import as_chat
from tunesmith.data.tokenize import tokenize_rows_batched
from tunesmith.errors import DataError, ModelLoadError
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.recipes.dpo import reward_scores


def load_reward_model(run: str, device: str = "auto") -> tuple[nn.Module, PreTrainedTokenizerBase, Config]:
    """The reward model of a ``task: reward`` run folder, its tokenizer and its config."""
    path = Path(run)
    if not (path / "config.yaml").is_file() or not (path / "model").is_dir():
        raise ModelLoadError(f"{run}: not a finished run folder (config.yaml and model/)")
    config = Config.model_validate(read_yaml(path / "config.yaml"))
    if config.task != "reward":
        raise ModelLoadError(f"{run} is a task {config.task} run, not a reward model (task: reward)")
    folder = path / "model"
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(folder), device=device))
    if (folder / "adapter_config.json").is_file():
        quantization = config.method.quantization if config.method.type == "qlora" else None
        base = load_model(config.model.model_copy(update={"device": device}), quantization, head="score")
        model = PeftModel.from_pretrained(base, folder)
    else:
        model = load_model(ModelConfig(name_or_path=str(folder), device=device), head="score")
    return model.eval(), tokenizer, config


@dataclass
class Scored:
    where: str
    scores: dict[str, float]  # {"score": s} for a chat row; {"chosen": s, "rejected": s} for a pair


def score_file(model: nn.Module, tokenizer: PreTrainedTokenizerBase, file: str, max_seq_len: int,
               batch_size: int = 8) -> list[Scored]:
    """Every row of ``file`` scored: chat rows and unpaired replies once, preference pairs on both sides."""
    report = DataReport()
    rows = read_canonical(DatasetConfig(path=file), report)
    if report.errors:
        raise DataError(report.errors, report.warnings, consequence="nothing was scored")
    jobs = [(r, side) for r in rows for side in (("chosen", "rejected") if "chosen" in r.row else ("score",))]
    tokenized = tokenize_rows_batched(tokenizer, [as_chat(r.row, None if side == "score" else side)
                                                  for r, side in jobs], max_seq_len)
    values: list[float] = []
    device = next(model.parameters()).device
    for start in range(0, len(jobs), batch_size):
        chunk = [{"input_ids": t.input_ids, "labels": t.input_ids} for t in tokenized[start:start + batch_size]]
        batch = {k: v.to(device) for k, v in collate_batch(chunk, tokenizer.pad_token_id).items()}
        with torch.no_grad():
            values += reward_scores(model, batch).tolist()
    scored: dict[str, Scored] = {}
    for (row, side), value in zip(jobs, values):
        scored.setdefault(row.where, Scored(row.where, {})).scores[side] = value
    return list(scored.values())


def summary_line(scored: list[Scored]) -> str:
    pairs = [s.scores for s in scored if "chosen" in s.scores]
    singles = [s.scores["score"] for s in scored if "score" in s.scores]
    parts = [f"{len(scored)} rows scored"]
    if pairs:
        right = sum(p["chosen"] > p["rejected"] for p in pairs)
        margin = sum(p["chosen"] - p["rejected"] for p in pairs) / len(pairs)
        parts.append(f"pairwise accuracy {right / len(pairs):.3f} ({right}/{len(pairs)}), mean margin {margin:.3f}")
    if singles:
        parts.append(f"mean score {sum(singles) / len(singles):.3f}")
    return "; ".join(parts)


def as_jsonl(scored: list[Scored]) -> str:
    return "".join(json.dumps({"row": s.where, **s.scores}) + "\n" for s in scored)
