"""task: dpo: the pairs are checked before training, packed sequences give the padded ones'
log-probabilities, every loss of the family trains, and DPO's reward margin grows."""

import json

import pytest
import torch

from tunesmith.config.load import build_config
from tunesmith.data.pairs import collate_pairs
from tunesmith.errors import DataError
from tunesmith.cli.train import recipe_for
from tunesmith.losses.logprobs import sequence_logps
from helpers import counting_pairs, read_metrics, tiny_tree, write_jsonl


def run_pairs(config):
    """The recipe `tunesmith train` picks for the config's task (dpo or reward)."""
    return recipe_for(config.task)(config)


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", counting_pairs())


def dpo_tree(tiny_model_dir, data, out, loss="dpo", method="lora", **training):
    tree = tiny_tree(tiny_model_dir, data, out, method or "lora", **{"max_steps": 12, "eval_every": 12, **training})
    tree["task"] = "dpo"
    tree["data"]["eval_fraction"] = 0.25
    tree["preference"] = {"loss": loss, "beta": 0.5, **({"label_smoothing": 0.1} if loss in ("cdpo", "robust")
                                                        else {})}
    return tree


def test_dpo_margin_grows_and_held_out_accuracy_rises(tiny_model_dir, pairs_file, tmp_path):
    run = run_pairs(build_config(dpo_tree(tiny_model_dir, pairs_file, tmp_path / "runs", max_steps=20, eval_every=5)))
    records = read_metrics(run.run_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert train[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert train[-1]["rewards/margin"] > train[0]["rewards/margin"] + 0.5
    assert evals[-1]["eval_rewards/margin"] > evals[0]["eval_rewards/margin"]
    assert evals[-1]["eval_rewards/accuracy"] > 0.5
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["task"] == "dpo" and summary["final_eval_rewards/accuracy"] == evals[-1]["eval_rewards/accuracy"]
    assert (run.run_dir / "model" / "adapter_config.json").is_file()


@pytest.mark.parametrize("loss", ["cdpo", "robust", "ipo", "simpo", "orpo", "kto"])
def test_every_loss_of_the_family_learns_the_preference(tiny_model_dir, pairs_file, tmp_path, loss):
    """Trained 12 steps, each prefers the chosen replies of the held-out pairs: accuracy and margin
    of its implicit rewards (β·log-ratio; β·mean log-prob for the reference-free SimPO and ORPO)."""
    run = run_pairs(build_config(dpo_tree(tiny_model_dir, pairs_file, tmp_path / "runs", loss)))
    records = read_metrics(run.run_dir)
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in records if "loss" in r])))
    final = [r for r in records if "eval_loss" in r][-1]
    assert final["eval_rewards/accuracy"] >= 0.8 and final["eval_rewards/margin"] > 0.1


def test_precomputed_reference_gives_the_same_run(tiny_model_dir, pairs_file, tmp_path):
    runs = [run_pairs(build_config(dpo_tree(tiny_model_dir, pairs_file, tmp_path / f"runs-{flag}", max_steps=4,
                                          optimizer="sgd", lr=0.1) | {"name": f"r{flag}"}
                                 | {"preference": {"beta": 0.5, "precompute_reference": flag}}))
            for flag in (False, True)]
    first, second = ([r["loss"] for r in read_metrics(run.run_dir) if "loss" in r] for run in runs)
    assert first == pytest.approx(second, abs=1e-5)


def test_packed_pairs_score_as_padded_ones(tiny_model_dir, tokenizer):
    from tunesmith.config.schema import DataConfig
    from tunesmith.data.pairs import _tokenized_pairs
    from tunesmith.data.build import CanonicalRow, DataReport
    from transformers import AutoModelForCausalLM

    from tunesmith.data.preference import preference_to_canonical

    rows = [CanonicalRow("x", i, preference_to_canonical(p, "preference")[0], "preference")
            for i, p in enumerate(counting_pairs(5), 1)]
    pairs = _tokenized_pairs(rows, tokenizer, DataConfig(train="x", max_seq_len=64), DataReport())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        packed = sequence_logps(model, collate_pairs(pairs, True, tokenizer.pad_token_id))
        padded = sequence_logps(model, collate_pairs(pairs, False, tokenizer.pad_token_id))
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-4)
    assert packed[1].tolist() == padded[1].tolist() and len(packed[1]) == 10
    assert (packed[1] > 0).all()


def test_bad_pairs_are_named_before_any_run_folder(tiny_model_dir, tmp_path):
    rows = counting_pairs(6)
    rows[2]["rejected"] = rows[2]["chosen"]
    del rows[4]["chosen"]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as caught:
        run_pairs(build_config(dpo_tree(tiny_model_dir, data, tmp_path / "runs")))
    text = "\n".join(caught.value.problems)
    assert f"{data}:3: rejected: chosen and rejected are identical" in text
    assert f"{data}:5: chosen: missing" in text
    assert not (tmp_path / "runs").exists()


def test_tunesmith_train_runs_a_dpo_config(tiny_model_dir, pairs_file, tmp_path, capsys):
    import yaml

    from tunesmith.cli.main import main

    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump(dpo_tree(tiny_model_dir, pairs_file, tmp_path / "runs", max_steps=2)))
    assert main(["train", str(config)]) == 0
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["task"] == "dpo" and summary["steps"] == 2 and "final_eval_rewards/accuracy" in summary


def reward_tree(tiny_model_dir, data, out, method="lora", **training):
    tree = dpo_tree(tiny_model_dir, data, out, method=None, **{"max_steps": 30, "eval_every": 30, **training})
    tree["task"] = "reward"
    tree["method"]["type"] = method
    del tree["preference"]
    return tree


@pytest.mark.parametrize("method", ["lora", "full"])
def test_reward_model_learns_the_pairs_and_scores_a_file(tiny_model_dir, pairs_file, tmp_path, capsys, method):
    from tunesmith.cli.main import main

    run = run_pairs(build_config(reward_tree(tiny_model_dir, pairs_file, tmp_path / "runs", method)))
    records = read_metrics(run.run_dir)
    final = [r for r in records if "eval_loss" in r][-1]
    assert final["eval_rewards/accuracy"] == 1.0 and final["eval_loss"] < 0.3  # loss starts at log 2 = 0.69
    assert (run.run_dir / "model" / ("adapter_config.json" if method == "lora" else "config.json")).is_file()
    # Scoring from the saved folder gives what training saw: the eval pairs ranked the same way.
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "Count to 3."},
                                                                 {"role": "assistant", "content": c}]}
                                                   for c in ("1 2 3", "3 2 1")])
    assert main(["reward", "score", str(run.run_dir), "--file", str(pairs_file), "--out", str(tmp_path / "s.jsonl")]) == 0
    assert "pairwise accuracy 1.000 (ties as half; 24 won, 0 tied, 0 lost of 24)" in capsys.readouterr().out
    scored = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(scored) == 24 and all(s["chosen"] > s["rejected"] for s in scored)
    assert main(["reward", "score", str(run.run_dir), "--file", str(chats)]) == 0
    up, down = (json.loads(line)["score"] for line in capsys.readouterr().out.splitlines())
    assert up > down


def test_reward_scores_packed_equal_padded(tiny_model_dir, tokenizer):
    from tunesmith.adapters.apply import apply_method
    from tunesmith.config.schema import MethodConfig, ModelConfig
    from tunesmith.models.load import load_model
    from tunesmith.losses.logprobs import reward_scores

    model = apply_method(load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu"), head="score"),
                         MethodConfig(type="full")).eval()
    rows = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in (3, 7, 4)]
    from tunesmith.data.collate import collate_batch
    from tunesmith.data.pack import collate_padding_free
    with torch.no_grad():
        packed = reward_scores(model, collate_padding_free(rows))
        padded = reward_scores(model, collate_batch(rows, tokenizer.pad_token_id))
        alone = torch.cat([reward_scores(model, collate_batch([r], 0)) for r in rows])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_long_pairs_lose_the_start_of_the_prompt_not_the_reply(tokenizer):
    """Cut on the right, a long pair's two sides would become one sequence; the cut is on the left."""
    from tunesmith.config.schema import DataConfig
    from tunesmith.data.build import CanonicalRow, DataReport
    from tunesmith.data.pairs import _tokenized_pairs
    from tunesmith.data.preference import preference_to_canonical

    row = {"prompt": "Tell me about bees. " * 40, "chosen": "Bees make honey.", "rejected": "Bees are fish."}
    report = DataReport()
    [pair] = _tokenized_pairs([CanonicalRow("f.jsonl", 1, preference_to_canonical(row, "preference")[0],
                                            "preference")], tokenizer, DataConfig(train="x", max_seq_len=48), report)
    for side, text in (("chosen", "Bees make honey."), ("rejected", "Bees are fish.")):
        ids, labels = pair[f"{side}_input_ids"], pair[f"{side}_labels"]
        assert len(ids) == len(labels) == 48
        assert text in tokenizer.decode([t for t in labels if t != -100])  # the whole reply still trains
    assert pair["chosen_input_ids"] != pair["rejected_input_ids"]
    assert report.truncated == 2 and "the start of the prompt was cut" in report.warnings[0]


def unpaired_rows(count=36):
    """KTO's unpaired rows on the counting task: twice as many undesirable replies (counting down)
    as desirable ones (counting up), each a row of its own, the prompts not lined up in pairs."""
    rows = []
    for index in range(count):
        n = 2 + index % 9
        desirable = index % 3 == 0
        numbers = range(1, n + 1) if desirable else range(n, 0, -1)
        rows.append({"prompt": f"Count to {n}.", "completion": " ".join(str(i) for i in numbers), "label": desirable})
    return rows


def test_kto_learns_from_unpaired_rows(tiny_model_dir, pairs_file, tmp_path):
    """Unpaired rows with a desirable flag train KTO; held-out *pairs* measure what it learnt."""
    data = write_jsonl(tmp_path / "unpaired.jsonl", unpaired_rows())
    tree = dpo_tree(tiny_model_dir, data, tmp_path / "runs", "kto", max_steps=16, eval_every=8)
    tree["data"]["eval"] = str(pairs_file)
    run = run_pairs(build_config(tree))
    records = read_metrics(run.run_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert {"rewards/desirable", "rewards/undesirable", "kl_reference_point"} <= set(train[0])
    assert train[-1]["rewards/margin"] > train[0]["rewards/margin"] + 0.3
    assert train[-1]["rewards/desirable"] > 0 > train[-1]["rewards/undesirable"]
    assert evals[-1]["eval_rewards/accuracy"] >= 0.8 and evals[-1]["eval_rewards/margin"] > 0.1


def test_kto_splits_pairs_and_precomputes_unpaired_references(tiny_model_dir, tokenizer, tmp_path):
    """A KTO run's training rows are unpaired (a pair gives a desirable and an undesirable row);
    reference log-probabilities computed once give the run the on-the-fly reference gives."""
    from tunesmith.config.schema import DataConfig
    from tunesmith.data.pairs import build_pair_datasets

    mixed = write_jsonl(tmp_path / "mixed.jsonl", unpaired_rows(6))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", counting_pairs(4))
    train, held, _ = build_pair_datasets(DataConfig(train=[str(mixed), str(pairs)], eval=str(pairs)), tokenizer,
                                         unpaired=True)
    assert len(train) == 6 + 2 * 4 and sorted(set(train.column_names)) == ["desirable", "input_ids", "labels",
                                                                          "where"]
    assert sum(train["desirable"]) == 2 + 4 and "chosen_input_ids" in held.column_names  # eval pairs stay pairs
    batch = collate_pairs([train[i] for i in range(3)], True, tokenizer.pad_token_id)
    assert batch["desirable"].tolist() == [True, False, False] and int((batch["position_ids"] == 0).sum()) == 3

    losses = []
    for flag in (False, True):
        tree = dpo_tree(tiny_model_dir, mixed, tmp_path / f"runs-{flag}", "kto", max_steps=3, optimizer="sgd", lr=0.1)
        tree["preference"]["precompute_reference"] = flag
        run = run_pairs(build_config(tree))
        losses.append([r["loss"] for r in read_metrics(run.run_dir) if "loss" in r])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_unpaired_rows_are_checked_and_need_kto(tiny_model_dir, tmp_path):
    rows = unpaired_rows(6)
    rows[1]["label"] = "yes"
    rows[3]["completion"] = " "
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as caught:
        run_pairs(build_config(dpo_tree(tiny_model_dir, bad, tmp_path / "runs", "kto")))
    text = "\n".join(caught.value.problems)
    assert f"{bad}:2: label: must be true (a desirable reply) or false (an undesirable one), not 'yes'" in text
    assert f"{bad}:4: completion: the reply is empty" in text
    good = write_jsonl(tmp_path / "good.jsonl", unpaired_rows(6))
    with pytest.raises(DataError) as caught:
        run_pairs(build_config(dpo_tree(tiny_model_dir, good, tmp_path / "runs", "dpo")))
    assert f"{good}:1: row: unpaired rows (prompt, completion, label) train only with preference.loss kto" in \
        "\n".join(caught.value.problems)
    assert not (tmp_path / "runs").exists()
