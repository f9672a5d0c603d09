"""Label masks: decoding the label tokens gives exactly the assistant texts plus EOS, per format."""

import re

import pytest
from transformers import AutoTokenizer

from tunesmith.config.schema import DataConfig
from tunesmith.data.build import build_datasets
from tunesmith.data.formats import to_canonical
from tunesmith.data.tokenize import IGNORE_INDEX, tokenize_row
from tunesmith.errors import DataError
from tunesmith.models.load import ALPACA_TEMPLATE
from helpers import write_jsonl


def trained_text(tokenizer, row, **kwargs) -> str:
    tokenized = tokenize_row(tokenizer, row, max_seq_len=kwargs.pop("max_seq_len", 512), **kwargs)
    assert len(tokenized.input_ids) == len(tokenized.labels)
    return tokenizer.decode([label for label in tokenized.labels if label != IGNORE_INDEX])


CASES = {
    "openai": ({"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "It is 4."}]}, ["Hello.", "It is 4."]),
    "sharegpt": ({"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue"},
                                    {"from": "human", "value": "Another?"}, {"from": "gpt", "value": "Green"}]},
                 ["Blue", "Green"]),
    "alpaca": ({"instruction": "Translate to French.", "input": "cat", "output": "chat"}, ["chat"]),
}


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_labels_are_the_assistant_texts_plus_eos(tokenizer, fmt):
    raw, replies = CASES[fmt]
    row, problems = to_canonical(raw, fmt)
    assert not problems
    eos = tokenizer.eos_token
    assert trained_text(tokenizer, row) == "".join(reply + eos for reply in replies)


def test_text_rows_train_on_everything_and_end_with_eos(tokenizer):
    row, _ = to_canonical({"text": "Plain text to continue."}, "text")
    assert trained_text(tokenizer, row) == "Plain text to continue." + tokenizer.eos_token


def test_train_on_prompt_labels_every_token(tokenizer):
    row, _ = to_canonical(CASES["openai"][0], "openai")
    tokenized = tokenize_row(tokenizer, row, 512, train_on_prompt=True)
    assert tokenized.labels == tokenized.input_ids


def test_alpaca_template_for_base_models_without_one(embedded_dir):
    base = AutoTokenizer.from_pretrained(embedded_dir)
    base.chat_template = ALPACA_TEMPLATE
    row, _ = to_canonical(CASES["sharegpt"][0], "sharegpt")
    assert trained_text(base, row) == "Blue" + base.eos_token + "Green" + base.eos_token
    prompt = base.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "### Instruction:\nQ\n\n### Response:\n"


def test_truncation_to_zero_labels_is_an_error_or_a_counted_drop(tokenizer, tmp_path):
    long_prompt = "word " * 200
    rows = [{"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "short"}, {"role": "assistant", "content": "fine"}]}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError) as caught:
        build_datasets(DataConfig(train=str(path), max_seq_len=64), tokenizer)
    [problem] = caught.value.problems
    assert re.fullmatch(rf"{re.escape(str(path))}:1: labels: row has no trainable token after truncation to 64 "
                        r"tokens \(the row has 2\d\d tokens\); raise data.max_seq_len, shorten the prompt, "
                        r"or set data.empty_labels: drop", problem), problem
    train, _, report = build_datasets(DataConfig(train=str(path), max_seq_len=64, empty_labels="drop"), tokenizer)
    assert len(train) == 1 and report.dropped_empty == 1 and report.truncated == 1
    assert train[0]["where"] == f"{path}:2"


def test_turn_end_token_other_than_eos_is_trained_and_a_raising_template_names_the_row(embedded_dir, tmp_path):
    from tunesmith.data.tokenize import turn_end_token

    base = AutoTokenizer.from_pretrained(embedded_dir)
    base.eos_token = "<|endoftext|>"  # a base model: EOS is not the ChatML turn end
    assert turn_end_token(base) == "<|im_end|>"
    row, _ = to_canonical(CASES["sharegpt"][0], "sharegpt")
    assert trained_text(base, row) == "Blue<|im_end|>Green<|im_end|>"
    base.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                          "{{ raise_exception('System role not supported') }}{% endif %}"
                          "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}")
    path = write_jsonl(tmp_path / "s.jsonl", [CASES["openai"][0], CASES["sharegpt"][0]["conversations"] and
                                             {"messages": [{"role": "user", "content": "a"},
                                                           {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError) as caught:
        build_datasets(DataConfig(train=str(path)), base)
    assert caught.value.problems == [f"{path}:1: messages: the chat template refused this row: System role not "
                                     f"supported"]
