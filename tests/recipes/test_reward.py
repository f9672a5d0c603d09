"""Reward models score a conversation one way everywhere: training, its eval, `reward score` and PPO's
reward model all cut an over-long conversation from the left (the prompt's start), never the reply."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from helpers import tiny_tree, write_jsonl
from tunesmith.config.load import build_config
from tunesmith.recipes.reward import run_reward

MAX_SEQ_LEN = 48


def long_pairs(count: int = 12) -> list[dict]:
    """Pairs whose prompt alone passes MAX_SEQ_LEN for every third row: only a cut from the left keeps
    the replies (the one place the two sides differ)."""
    rows = []
    for index in range(count):
        n = 2 + index % 7
        filler = " ".join(["Please read this long preamble carefully."] * 12) if index % 3 == 0 else ""
        rows.append({"prompt": f"{filler} Count to {n}.".strip(), "chosen": " ".join(map(str, range(1, n + 1))),
                     "rejected": " ".join(map(str, range(n, 0, -1)))})
    return rows


@pytest.fixture(scope="module")
def reward_run(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reward")
    train = write_jsonl(folder / "train.jsonl", long_pairs(16))
    held = write_jsonl(folder / "held.jsonl", long_pairs(9)[::-1])
    tree = tiny_tree(tiny_model_dir, train, folder / "runs", "lora", max_steps=6, eval_every=6, batch_size=4)
    tree.update(task="reward", data={"train": str(train), "eval": str(held), "max_seq_len": MAX_SEQ_LEN})
    config = build_config(tree)
    return run_reward(config).run_dir, config, held


def test_reward_score_gives_the_training_time_evaluation_per_pair(reward_run, tmp_path, tokenizer):
    """Seen failing before the fix: `reward score` cut long rows on the right, so a third of these pairs
    scored as two identical sequences (different from what the training eval scored)."""
    from tunesmith.cli.main import main
    from tunesmith.data.pairs import build_pair_datasets, collate_pairs
    from tunesmith.losses.logprobs import reward_scores
    from tunesmith.targets import load_target

    run_dir, config, held = reward_run
    assert any(len(tokenizer(r["prompt"])["input_ids"]) > MAX_SEQ_LEN
               for r in long_pairs(9))  # the held-out pairs include over-long ones
    out = tmp_path / "scores.jsonl"
    assert main(["reward", "score", str(run_dir), "--file", str(held), "--out", str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    # The training-time evaluation of the same pairs: the eval set as training builds and batches it.
    model, _ = load_target(str(run_dir), "cpu", head="score")
    _, eval_rows, _ = build_pair_datasets(config.data, tokenizer, config.training.seed)
    expected = []
    with torch.no_grad():
        for start in range(0, len(eval_rows), 4):
            batch = collate_pairs([eval_rows[i] for i in range(start, min(start + 4, len(eval_rows)))], packed=True,
                                  pad_token_id=tokenizer.pad_token_id)
            scores = reward_scores(model.eval(), batch)
            half = scores.shape[0] // 2
            expected += list(zip(scores[:half].tolist(), scores[half:].tolist()))
    assert len(scored) == len(expected) == 9
    for row, (chosen, rejected) in zip(scored, expected):
        assert row["chosen"] == pytest.approx(chosen, abs=1e-5) and row["rejected"] == pytest.approx(rejected, abs=1e-5)
        assert "identical" not in row


def test_ppo_reward_model_sees_the_completion_after_a_long_prompt(reward_run):
    """Seen failing before the fix: the completion was cut away, so every completion scored the same."""
    from tunesmith.evaluation.reward import RewardModelScorer

    run_dir, _, _ = reward_run
    scorer = RewardModelScorer(str(run_dir), torch.device("cpu"), MAX_SEQ_LEN)
    prompt = [{"role": "user", "content": " ".join(["Please read this long preamble carefully."] * 20) + " Count to 4."}]
    up, down, other = scorer([prompt] * 3, ["1 2 3 4", "4 3 2 1", "banana"], ["", "", ""])
    assert len({up, down, other}) == 3


def test_ties_are_reported_and_identical_sides_warned(reward_run, tmp_path, caplog):
    from tunesmith.evaluation.reward import pair_statistics, score_file, summary_line
    from tunesmith.targets import load_target

    run_dir, _, _ = reward_run
    model, tokenizer = load_target(str(run_dir), "cpu", head="score")
    common = " ".join(str(i) for i in range(1, 60))  # longer than MAX_SEQ_LEN on its own
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "Count.", "chosen": f"Sure: {common}",
                                                  "rejected": f"No: {common}"},
                                                 {"prompt": "Count to 2.", "chosen": "1 2", "rejected": "2 1"}])
    scored = score_file(model.eval(), tokenizer, str(same), MAX_SEQ_LEN)
    stats = pair_statistics(scored)
    assert stats.ties == 1 and stats.identical == 1 and scored[0].identical
    assert stats.accuracy in (0.25, 0.75)  # the tie counts half; the other pair is won or lost
    assert "1 tied" in summary_line(scored) and "1 pairs identical after truncation" in summary_line(scored)
    assert "the chosen and rejected sides are the same" in caplog.text
    assert "the reply alone is" in caplog.text  # each over-long side is named


def test_no_hh_pair_is_cut_to_identical_sides(reward_run, shared_data, tmp_path):
    """The first 200 valid pairs of the HH sample at max_seq_len 192: before the fix about a quarter
    scored two identical sequences."""
    from tunesmith.evaluation.reward import pair_statistics, score_file
    from tunesmith.targets import load_target

    run_dir, _, _ = reward_run
    rows = [json.loads(line) for line in gzip.open(shared_data / "hh_rlhf_harmless_sample.jsonl.gz", "rt")]
    from tunesmith.data.formats import to_canonical

    def is_valid(row: dict) -> bool:
        canonical, problems = to_canonical(row, "hh")
        return canonical is not None and not any(p.severity == "error" for p in problems)
    valid = [r for r in rows if is_valid(r)][:200]
    file = write_jsonl(tmp_path / "hh200.jsonl", valid)
    model, tokenizer = load_target(str(run_dir), "cpu", head="score")
    scored = score_file(model.eval(), tokenizer, str(file), 192, batch_size=16)
    stats = pair_statistics(scored)
    assert stats.pairs == 200 and stats.identical == 0 and stats.ties == 0
    assert all(math.isfinite(s.scores["chosen"]) for s in scored)


def test_a_reward_run_with_added_tokens_and_lora_loads_for_scoring(tiny_model_dir, tmp_path):
    """models.inference resizes the base's embeddings for the run's added tokens (the old reward loader
    did not, so such a run failed to load)."""
    from tunesmith.targets import load_target

    data = write_jsonl(tmp_path / "pairs.jsonl", long_pairs(8))
    tree = tiny_tree(tiny_model_dir, data, tmp_path / "runs", "lora", max_steps=2)
    tree.update(task="reward")
    tree["model"]["add_tokens"] = ["<countdown>", "<countup>"]
    run_dir = run_reward(build_config(tree)).run_dir
    from tunesmith.evaluation.reward import score_conversations

    model, tokenizer = load_target(str(run_dir), "cpu", head="score")
    assert tokenizer.convert_tokens_to_ids("<countup>") >= len(tokenizer) - 2
    score, = score_conversations(model.eval(), tokenizer, [[{"role": "user", "content": "Count to 3 <countup>"},
                                                            {"role": "assistant", "content": "1 2 3"}]], 64)
    assert math.isfinite(score)
