"""Fixtures: a tiny random Llama with the embedded tokenizer, small chat data, config builders."""

from __future__ import annotations

import os
from pathlib import Path

import sys

import pytest
import torch
from helpers import counting_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TUNESMITH_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests marked slow or long first, each group in its collected order: on two workers (make test),
    tests of a minute or more that were collected last (tests/server, tests/test_sweep.py) ran on one worker
    while the other stood idle at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None and item.get_closest_marker("long") is None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (real data no one here wrote); absent in a fresh clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (the shared real-data folder is not beside this checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once and cached."""
    from tunesmith.models.load import prepare_embedded

    return prepare_embedded()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A 2-layer random Llama (hidden 64) with the embedded tokenizer, saved as a HF folder.

    initializer_range is large so that logits can move: with the default 0.02, tied 64-wide
    embeddings cap every logit near 1.3 and frozen-base methods cannot lower the loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", counting_rows())


@pytest.fixture(autouse=True)
def no_outside_mlflow(monkeypatch):
    """No test logs to a developer's MLflow server, and none leaves mlflow pointing at its store
    (recorded as set, so that whatever a test sets is undone)."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        leaked = mlflow.active_run()
        while mlflow.active_run() is not None:
            mlflow.end_run(status="FAILED")
        mlflow.set_tracking_uri(None)
        assert leaked is None, f"the test left MLflow run {leaked.info.run_id} active"
