"""`tunesmith eval`: perplexity by hand, the libraries' own ROUGE/BLEU/chrF, bootstrap intervals, an A/B
report of a fine-tuned tiny model against its base, drift, and bad rows named before any model loads."""

import json
import math

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from sacrebleu import corpus_bleu, corpus_chrf

from tunesmith.cli.main import main
from tunesmith.config.load import build_config
from tunesmith.data.tokenize import tokenize_messages
from tunesmith.evaluation import metrics as m
from tunesmith.data.tokenize import TokenizedRow
from tunesmith.evaluation.run import EvalOptions, EvalRow, drift, likelihoods, read_eval_rows, reference_only
from tunesmith.models.inference import load_for_inference
from tunesmith.recipes.sft import run_sft
from helpers import counting_rows, tiny_tree, write_jsonl

PREDICTIONS = ["the cat sat on the mat", "a quick brown fox jumps", "hello there general kenobi",
               "one two three four five", "it is raining cats and dogs today"]
REFERENCES = ["the cat is on the mat", "the quick brown fox jumped over", "hello there",
              "one two three four five", "today it rains cats and dogs"]


def test_perplexity_is_exp_of_the_mean_token_nll_computed_by_hand(tiny_model_dir):
    model, tokenizer = load_for_inference(str(tiny_model_dir), "cpu")
    rows = [EvalRow(f"f:{i}", r["messages"]) for i, r in enumerate(counting_rows(7))]
    nll, tokens = likelihoods(model, tokenizer, rows, EvalOptions(metrics=["loss"], batch_size=3, max_seq_len=64))
    total_nll = total_tokens = 0.0
    with torch.no_grad():  # one unpadded row at a time: NLL of each reply token given everything before it
        for row in rows:
            encoded = tokenize_messages(tokenizer, row.messages, 64)
            ids, labels = torch.tensor([encoded.input_ids]), torch.tensor(encoded.labels)
            logp = model(ids).logits[0].double().log_softmax(-1)
            for position in range(1, len(labels)):
                if labels[position] != -100:
                    total_nll -= float(logp[position - 1, labels[position]])
                    total_tokens += 1
    assert tokens.sum() == total_tokens
    everything = np.arange(len(rows))
    assert m.loss_of(nll, tokens)(everything) == pytest.approx(total_nll / total_tokens, rel=1e-5)
    assert m.loss_of(nll, tokens, exponentiate=True)(everything) == pytest.approx(
        math.exp(total_nll / total_tokens), rel=1e-5)


def test_rouge_bleu_and_chrf_equal_the_libraries_own_numbers():
    everything = np.arange(len(PREDICTIONS))
    ours = m.rouge_rows(PREDICTIONS, REFERENCES, ["rouge1", "rouge2", "rougeL"])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for kind in ("rouge1", "rouge2", "rougeL"):
        theirs = [100 * scorer.score(r, p)[kind].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)]
        assert m.mean_of(ours[kind])(everything) == pytest.approx(sum(theirs) / len(theirs))
    bleu = m.corpus_metric("bleu", PREDICTIONS, REFERENCES)
    chrf = m.corpus_metric("chrf", PREDICTIONS, REFERENCES)
    assert bleu(everything) == pytest.approx(corpus_bleu(PREDICTIONS, [REFERENCES]).score)
    assert chrf(everything) == pytest.approx(corpus_chrf(PREDICTIONS, [REFERENCES]).score)
    resample = np.array([0, 0, 3, 4, 4])  # what the bootstrap draws: rows repeated
    assert bleu(resample) == pytest.approx(corpus_bleu([PREDICTIONS[i] for i in resample],
                                                       [[REFERENCES[i] for i in resample]]).score)
    assert chrf(resample) == pytest.approx(corpus_chrf([PREDICTIONS[i] for i in resample],
                                                       [[REFERENCES[i] for i in resample]]).score)
    assert 0 < bleu(everything) < 100


def test_exact_match_normalisation_and_extraction():
    assert m.exact_match(" The  Paris! ", "paris") == 1.0
    assert m.exact_match(" The  Paris! ", "paris", steps=()) == 0.0
    assert m.exact_match("Paris", "paris", steps=("whitespace",)) == 0.0
    assert m.exact_match("so 2 + 2 = 4, then 4 * 3 = 12", "work...\n#### 12", "number") == 1.0
    assert m.exact_match("it is 13", "#### 12", "number") == 0.0
    assert m.exact_match("Answer: (C) because", "C", r"\(([A-D])\)") == 1.0
    assert m.regex_match("Name: Ada\nAge: 36", r"^Name: \w+\nAge: \d+$") == 1.0
    assert m.regex_match("Name: Ada", r"^Age") == 0.0
    with pytest.raises(ValueError, match="unknown metric 'bleurt'"):
        m.parse_metrics("bleu,bleurt")


def test_bootstrap_intervals_cover_the_value_and_pair_differences():
    values = np.random.default_rng(1).normal(3.0, 1.0, 200)
    statistic = m.mean_of(values)
    low, high = m.bootstrap(statistic, 200, 500)
    assert low < statistic(np.arange(200)) < high and high - low < 0.5
    shifted = m.mean_of(values + 0.25)  # the same rows, 0.25 better on each: the paired interval is tight
    assert m.bootstrap(shifted, 200, 500, minus=statistic) == pytest.approx((0.25, 0.25))
    assert all(math.isnan(v) for v in m.bootstrap(statistic, 1, 500))  # no interval from one row


def test_ab_report_shows_the_fine_tune_beats_its_base_and_drift_is_flagged(tiny_model_dir, chat_file, tmp_path,
                                                                            capsys):
    run = run_sft(build_config(tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", lr=1e-2)))
    held_out = write_jsonl(tmp_path / "held.jsonl", counting_rows(30)[24:])
    common = ["--data", str(held_out), "--metrics", "loss,perplexity,rouge,bleu,exact_match", "--max-new-tokens",
              "12", "--max-seq-len", "64", "--bootstrap", "200", "--device", "cpu"]
    assert main(["eval", str(tiny_model_dir), *common, "--out", str(tmp_path / "base")]) == 0
    base = json.loads((tmp_path / "base" / "eval.json").read_text())
    code = main(["eval", str(run.run_dir), *common, "--compare-base", "--baseline", str(tmp_path / "base" / "eval.json"),
                 "--fail-on-drift"])
    out = capsys.readouterr().out
    document = json.loads((run.run_dir / "eval-held" / "eval.json").read_text())
    assert document["compare"]["model"] == str(tiny_model_dir)
    tuned, untuned = document["metrics"]["loss"], document["compare"]["metrics"]["loss"]
    assert tuned["value"] < untuned["value"]
    assert untuned["value"] == pytest.approx(base["metrics"]["loss"]["value"], rel=1e-6)  # the base, evaluated again
    delta = document["compare"]["delta"]["loss"]
    assert delta["value"] == pytest.approx(tuned["value"] - untuned["value"])
    assert delta["ci95"][1] < 0 and delta["significant"]
    assert tuned["ci95"][0] <= tuned["value"] <= tuned["ci95"][1]
    assert document["data"]["rows"] == 6 and len(document["rows"]) == 6
    first = document["rows"][0]
    assert first["where"].endswith("held.jsonl:1") and first["reference"] == "1 2 3 4 5 6 7 8"
    assert isinstance(first["prediction"], str) and isinstance(first["compare_prediction"], str)
    assert set(first["scores"]) == {"loss", "rouge1", "rouge2", "rougeL", "exact_match"}
    assert code == 3 and document["drift"]["metrics"]["loss"]["flagged"]  # the base is the baseline: loss moved
    assert "DRIFT" in out and "drift beyond 5%: loss" in out
    page = (run.run_dir / "eval-held" / "report.html").read_text()
    assert str(tiny_model_dir) in page and "Generations" in page and "held.jsonl:6" in page


def test_bad_rows_and_options_are_named_before_any_model_loads(tmp_path, capsys):
    data = write_jsonl(tmp_path / "eval.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "and?"}]},
        {"text": "raw text"}])
    assert main(["eval", "no-such-model-folder", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: messages: the last turn must be the assistant's reference reply" in err
    assert f"{data}:3: row: is in text format but the file is in openai format" in err
    assert "nothing was evaluated" in err
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "raw text"}])
    assert main(["eval", "no-such-model-folder", "--data", str(text)]) == 2
    assert f"{text}:1: text: eval needs chat rows" in capsys.readouterr().err
    assert main(["eval", "embedded", "--data", str(data), "--metrics", "loss,bleurt", "--normalize", "case,stem",
                 "--extract", "(unclosed"]) == 2
    err = capsys.readouterr().err
    assert "unknown metric 'bleurt'" in err and "unknown step(s) stem" in err and "--extract: not a valid regex" in err
    good = write_jsonl(tmp_path / "good.jsonl", counting_rows(2))
    assert main(["eval", str(tmp_path), "--data", str(good), "--compare-base"]) == 1
    assert "has no base model; name the other model with --compare OTHER" in capsys.readouterr().err


def test_gsm8k_rows_read_as_references_with_their_final_number(shared_data):
    rows = read_eval_rows(shared_data / "gsm8k_train.jsonl", limit=5)
    assert len(rows) == 5 and rows[0].prompt[0]["role"] == "user" and "####" in rows[0].reference
    assert m.extract(rows[0].reference, "number") == "72"  # Natalia's clips
    assert m.exact_match("48 + 24 = 72 clips in all.", rows[0].reference, "number") == 1.0


def test_review_cases_numbers_json_drift_and_reference_only():
    assert m.exact_match("#### -5", "#### 5", "number") == 0.0  # signs and decimal points count
    assert m.exact_match("the answer is 3.5", "#### 35", "number") == 0.0
    assert m.exact_match("so 3.50", "#### 3.5", "number") == 1.0
    assert m.extract("1" * 400, "number") is None  # beyond float range: no number, no crash
    assert m.json_valid("NaN") == 0.0 and m.json_valid("[" * 5000) == 0.0
    moved = drift({"json_valid": {"value": 1.0, "ci95": [1.0, 1.0]}},
                  {"metrics": {"json_valid": {"value": 0.0, "ci95": [0.0, 0.0]}}}, 0.05)
    assert moved["json_valid"]["flagged"] and moved["json_valid"]["relative_change"] is None
    row = TokenizedRow([1, 2, 3, 4, 5, 6, 7, 8], [-100, 2, 3, -100, -100, 6, 7, -100], 8)
    kept = reference_only(row, 6)  # the last reply only, cut from the left
    assert kept.input_ids == [3, 4, 5, 6, 7, 8] and kept.labels == [-100, -100, -100, 6, 7, -100]


def test_a_string_label_is_not_kto_s_flag():
    from tunesmith.data.formats import detect_format

    assert detect_format({"prompt": "great film", "completion": "positive", "label": "positive"}) == "completion"
    assert detect_format({"prompt": "p", "completion": "c", "label": True}) == "unpaired"
