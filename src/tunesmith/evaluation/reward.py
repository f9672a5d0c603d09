"""Score rows with a trained reward model (``tunesmith reward score RUN --file F``, and the reward model
of ppo and online_dpo: ``RewardModelScorer``): each conversation encoded as reward training encodes it
(``data.pairs.encode_conversations``: an over-long one loses the start of its prompt, never its reply),
then the scoring head's value at its last token."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunesmith.config.schema import DatasetConfig
from tunesmith.data.build import DataReport, read_canonical
from tunesmith.data.collate import collate_batch
from tunesmith.data.pairs import encode_conversations
from tunesmith.data.preference import as_chat
from tunesmith.errors import ConfigError, DataError
from tunesmith.losses.logprobs import reward_scores
from tunesmith.targets import load_target, resolve_target

log = logging.getLogger(__name__)


@dataclass
class Scored:
    where: str
    scores: dict[str, float]  # {"score": s} for a chat row; {"chosen": s, "rejected": s} for a pair
    identical: bool = False  # a pair whose two sides are the same tokens after truncation


def score_sequences(model: nn.Module, pad_token_id: int, sequences: list[list[int]], batch_size: int = 8
                    ) -> list[float]:
    """The reward model's score of each token sequence, in padded batches."""
    values: list[float] = []
    device = next(model.parameters()).device
    for start in range(0, len(sequences), batch_size):
        chunk = [{"input_ids": ids, "labels": ids} for ids in sequences[start:start + batch_size]]
        batch = {k: v.to(device) for k, v in collate_batch(chunk, pad_token_id).items()}
        with torch.no_grad():
            values += reward_scores(model, batch).tolist()
    return values


def score_conversations(model: nn.Module, tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]],
                        max_seq_len: int, batch_size: int = 8) -> list[float]:
    """Each conversation (its last turn the reply to score) scored; PPO's reward-model scorer."""
    encoded = encode_conversations(tokenizer, [{"messages": c} for c in conversations], max_seq_len,
                                   ["completion"] * len(conversations))
    for tokenized, _ in encoded:
        if isinstance(tokenized, ValueError):
            raise DataError([f"a conversation could not be rendered for the reward model: {tokenized}"])
    return score_sequences(model, tokenizer.pad_token_id, [t.input_ids for t, _ in encoded], batch_size)


def check_reward_run(run: str, field: str) -> None:
    """``run`` is a finished ``task: reward`` run folder, else a ``ConfigError`` that names ``field``."""
    target = resolve_target(run)
    if target.run is None or not target.run.has_model:
        raise ConfigError([f"{field}: {run} is not a finished run folder (config.yaml and model/); train one with "
                           "task: reward"])
    if target.config.task != "reward":
        raise ConfigError([f"{field}: {run} is a task {target.config.task} run, not a reward model (task: reward)"])


class RewardModelScorer:
    """A ``task: reward`` run's model scoring prompt + completion as a chat (its own tokenizer and template),
    encoded as ``reward score`` and reward training encode it: a long prompt loses its start, never the
    completion. Called as a reward function: (prompts, completions, answers) -> one score each."""

    def __init__(self, run: str, device: torch.device, max_seq_len: int):
        self.model, self.tokenizer = load_target(run, str(device), head="score")
        self.model.eval().requires_grad_(False)
        self.max_seq_len = max_seq_len

    def __call__(self, prompts: list[list[dict]], completions: list[str], answers: list[str]) -> list[float]:
        conversations = [[*prompt, {"role": "assistant", "content": text}]
                         for prompt, text in zip(prompts, completions)]
        return score_conversations(self.model, self.tokenizer, conversations, self.max_seq_len, len(conversations))


def score_file(model: nn.Module, tokenizer: PreTrainedTokenizerBase, file: str, max_seq_len: int,
               batch_size: int = 8) -> list[Scored]:
    """Every row of ``file`` scored: chat rows and unpaired replies once, preference pairs on both sides.
    A pair whose two sides are identical tokens after truncation is marked and warned about."""
    report = DataReport()
    rows = read_canonical(DatasetConfig(path=file), report)
    jobs = [(r, side) for r in rows for side in (("chosen", "rejected") if "chosen" in r.row else ("score",))]
    encoded = encode_conversations(tokenizer, [as_chat(r.row, None if side == "score" else side) for r, side in jobs],
                                   max_seq_len, ["reply" if side == "score" else side for _, side in jobs])
    for (row, side), (tokenized, warning) in zip(jobs, encoded):
        if isinstance(tokenized, ValueError):
            report.add(row.file, row.line, side, str(tokenized))
        elif warning is not None:
            report.add(row.file, row.line, side, warning, "warning")
    if report.errors:
        raise DataError(report.errors, report.warnings, consequence="nothing was scored")
    for warning in report.warnings:
        log.warning("%s", warning)
    values = score_sequences(model, tokenizer.pad_token_id, [t.input_ids for t, _ in encoded], batch_size)
    scored: dict[str, Scored] = {}
    tokens: dict[str, dict[str, list[int]]] = {}
    for (row, side), (tokenized, _), value in zip(jobs, encoded, values):
        scored.setdefault(row.where, Scored(row.where, {})).scores[side] = value
        tokens.setdefault(row.where, {})[side] = tokenized.input_ids
    for where, item in scored.items():
        if "chosen" in item.scores and tokens[where]["chosen"] == tokens[where]["rejected"]:
            item.identical = True
            log.warning("%s: the chosen and rejected sides are the same %d tokens after truncation to max_seq_len "
                        "%d; the pair scores a tie", where, len(tokens[where]["chosen"]), max_seq_len)
    return list(scored.values())


@dataclass
class PairStatistics:
    pairs: int
    wins: int  # chosen scored above rejected
    ties: int  # the two sides scored exactly equal
    identical: int  # ... of which the two sides were the same tokens
    margin: float  # mean chosen - rejected

    @property
    def accuracy(self) -> float:
        """Ties count as half right (a coin flip would break them)."""
        return (self.wins + 0.5 * self.ties) / self.pairs

    @property
    def accuracy_without_ties(self) -> float | None:
        decided = self.pairs - self.ties
        return self.wins / decided if decided else None


def pair_statistics(scored: list[Scored]) -> PairStatistics | None:
    """Pairwise accuracy (ties as half), the count of ties and of identical pairs, the mean margin.

    >>> s = [Scored("a:1", {"chosen": 2.0, "rejected": 1.0}), Scored("a:2", {"chosen": 1.0, "rejected": 1.0}, True)]
    >>> stats = pair_statistics(s); stats.accuracy, stats.ties, stats.identical, stats.accuracy_without_ties
    (0.75, 1, 1, 1.0)
    """
    pairs = [s for s in scored if "chosen" in s.scores]
    if not pairs:
        return None
    wins = sum(p.scores["chosen"] > p.scores["rejected"] for p in pairs)
    ties = sum(p.scores["chosen"] == p.scores["rejected"] for p in pairs)
    margin = sum(p.scores["chosen"] - p.scores["rejected"] for p in pairs) / len(pairs)
    return PairStatistics(len(pairs), wins, ties, sum(p.identical for p in pairs), margin)


def summary_line(scored: list[Scored]) -> str:
    singles = [s.scores["score"] for s in scored if "score" in s.scores]
    parts = [f"{len(scored)} rows scored"]
    stats = pair_statistics(scored)
    if stats is not None:
        without = stats.accuracy_without_ties
        parts.append(f"pairwise accuracy {stats.accuracy:.3f} (ties as half; {stats.wins} won, {stats.ties} tied, "
                     f"{stats.pairs - stats.wins - stats.ties} lost of {stats.pairs}), "
                     + (f"{without:.3f} without ties, " if without is not None else "")
                     + f"mean margin {stats.margin:.3f}"
                     + (f"; {stats.identical} pairs identical after truncation" if stats.identical else ""))
    if singles:
        parts.append(f"mean score {sum(singles) / len(singles):.3f}")
    return "; ".join(parts)


def as_jsonl(scored: list[Scored]) -> str:
    return "".join(json.dumps({"row": s.where, **s.scores, **({"identical": True} if s.identical else {})}) + "\n"
                   for s in scored)
