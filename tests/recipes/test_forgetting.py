"""Continued pre-training and forgetting mitigation: packing, replay, KL to the base."""

import pytest
import torch

from tunesmith.config.load import build_config
from tunesmith.data.collate import collate_batch
from tunesmith.losses.sft import kl_to_reference_sum
from tunesmith.models.inference import load_for_inference
from tunesmith.recipes.sft import run_sft
from tunesmith.train.loop import MicroBatches
from helpers import counting_rows, read_metrics, tiny_tree, write_jsonl

HELD_OUT = ["What is the capital of France?", "Write a word that rhymes with cat.", "Name a colour."]


def test_pretrain_packs_documents_and_trains_every_token(tiny_model_dir, tmp_path):
    texts = [{"text": " ".join(f"{word}{i}" for i in range(n))} for n, word in
             ((40, "alpha"), (7, "beta"), (90, "gamma"), (15, "delta"))] * 3
    data = write_jsonl(tmp_path / "corpus.jsonl", texts)
    tree = tiny_tree(tiny_model_dir, data, tmp_path / "runs", "full", max_steps=12, lr=3e-3)
    tree["task"] = "pretrain"
    run = run_sft(build_config(tree))
    losses = [r["loss"] for r in read_metrics(run.run_dir) if "loss" in r]
    assert losses[-1] < losses[0]
    from tunesmith.models.load import load_tokenizer
    from tunesmith.recipes.base import build_training_data

    config = build_config(tree)
    train, _, _ = build_training_data(config, load_tokenizer(config.model))
    lengths = [len(ids) for ids in train["input_ids"]]
    assert all(length == 64 for length in lengths[:-1]) and 0 < lengths[-1] <= 64  # data.max_seq_len 64
    assert train["labels"] == train["input_ids"]  # loss on every token
    tokenizer = load_tokenizer(config.model)
    total = sum(len(tokenizer(t["text"], add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    assert sum(lengths) == total  # nothing truncated, nothing lost


def test_replay_rows_join_every_batch_deterministically():
    main = [{"input_ids": [1, i], "labels": [1, i]} for i in range(10)]
    general = [{"input_ids": [2, 100 + i], "labels": [2, 100 + i]} for i in range(3)]

    def collate(rows):
        return collate_batch(rows, 0)
    stream = MicroBatches(main, 4, seed=0, collate=collate, replay=general, replay_share=0.25)
    assert stream.batch_size == 3 and stream.per_epoch == 4
    seen = [stream[p]["input_ids"][:, 1].tolist() for p in range(8)]
    assert all(sum(v >= 100 for v in batch) == 1 for batch in seen[:3])
    replayed = [v for batch in seen for v in batch if v >= 100]
    assert sorted(replayed[:3]) == [100, 101, 102]  # the replay set is cycled through, all of it
    fresh = MicroBatches(main, 4, seed=0, collate=collate, replay=general, replay_share=0.25)
    assert [fresh[p]["input_ids"].tolist() for p in (7, 2)] == [stream[p]["input_ids"].tolist() for p in (7, 2)]


def batch_rows(batch: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of each row of a micro-batch, padded or padding-free."""
    if "attention_mask" in batch:
        return [(ids[mask.bool()].tolist(), labels[mask.bool()].tolist())
                for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    return [(batch["input_ids"][0, a:b].tolist(), batch["labels"][0, a:b].tolist()) for a, b in zip(starts, starts[1:])]


def test_replay_rows_are_trained_in_every_batch_of_a_run(tiny_model_dir, tokenizer, chat_file, tmp_path,
                                                          monkeypatch):
    """data.replay reaches the micro-batches the loop trains on: with batch_size 4 and share 0.25 each
    holds round(0.25 x 4) = 1 replay row, with its tokens trained, beside 3 training rows; over the run
    the replay set is cycled through (four steps, four different replay rows of five). Catches replay
    rows lost between the config and the loop, which a count of logged steps does not: seen failing
    with MicroBatches.__getitem__'s replay rows left out (3 rows per batch, none replayed)."""
    import tunesmith.train.loop as loop

    general = write_jsonl(tmp_path / "general.jsonl",
                          [{"text": f"Replay fact {i}: the sea is wide and blue."} for i in range(5)])
    trained: list[list[dict[str, torch.Tensor]]] = []
    train_step = loop._train_step

    def recording_step(model, objective, window, *args, **kwargs):
        trained.append([{key: value.clone() for key, value in batch.items()} for batch in window])
        return train_step(model, objective, window, *args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", recording_step)
    tree = tiny_tree(tiny_model_dir, chat_file, tmp_path / "runs", "lora", max_steps=4)
    tree["data"]["replay"] = {"path": str(general), "share": 0.25}
    run = run_sft(build_config(tree))
    assert len([r for r in read_metrics(run.run_dir) if "loss" in r]) == 4
    assert [len(window) for window in trained] == [1, 1, 1, 1]  # grad_accum 1: one micro-batch a step
    replayed = []
    for (batch,) in trained:
        rows = [(tokenizer.decode(ids), labels) for ids, labels in batch_rows(batch)]
        replay = [(text, labels) for text, labels in rows if "Replay fact" in text]
        assert len(rows) == 4 and len(replay) == 1, [text for text, _ in rows]
        assert sum("Count to" in text for text, _ in rows) == 3
        text, labels = replay[0]
        assert sum(label != -100 for label in labels) >= len(labels) - 2  # its tokens are trained
        replayed.append(text.split("Replay fact ")[1][0])
    assert len(set(replayed)) == 4, replayed


def kl_from_base(run_dir, base_dir):
    model, tokenizer = load_for_inference(str(run_dir), "cpu")
    base, _ = load_for_inference(str(base_dir), "cpu")
    total = 0.0
    for prompt in HELD_OUT:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            total += float(kl_to_reference_sum(model(ids).logits, base(ids).logits, ids))
    return total


def test_kl_to_base_zero_is_plain_sft_and_large_stays_closer(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", counting_rows())
    states, runs = [], {}
    for label, kl in (("plain", None), ("zero", 0.0), ("strong", 5.0)):
        tree = tiny_tree(tiny_model_dir, data, tmp_path / label, "lora", max_steps=20, lr=2e-2)
        if kl is not None:
            tree["regularization"] = {"kl_to_base": kl}
        run = run_sft(build_config(tree))
        runs[label] = run.run_dir
        states.append({k: v.clone() for k, v in run.model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # coefficient 0: bit for bit
    plain, strong = kl_from_base(runs["plain"], tiny_model_dir), kl_from_base(runs["strong"], tiny_model_dir)
    print(f"KL(model || base) on held-out prompts: plain SFT {plain:.4f}, kl_to_base=5: {strong:.4f}")
    assert strong < 0.5 * plain


@pytest.mark.parametrize("method", ["lora", "adapter", "prompt", "full"])
def test_base_reference_is_the_base_model(tiny_model_dir, tokenizer, method):
    """LoRA and prompt tuning switch their adapters off, bottleneck adapters bypass themselves, full
    fine-tuning keeps a frozen copy: each reference gives the base's logits, not the trained model's."""
    from transformers import AutoModelForCausalLM

    from tunesmith.adapters.apply import apply_method
    from tunesmith.config.schema import MethodConfig
    from tunesmith.recipes.base import base_reference

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         MethodConfig.model_validate({"type": method, "prompt": {"num_virtual_tokens": 4}}))
    reference = base_reference(model)
    with torch.no_grad():
        for parameter in model.parameters():  # training moves what the method trains
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.train()
    inputs = {"input_ids": tokenizer("Count to 3.", return_tensors="pt")["input_ids"]}
    with torch.no_grad():
        expected = base(**inputs).logits
        got = reference(inputs)[:, -expected.shape[1]:]
        trained = model(**inputs).logits[:, -expected.shape[1]:]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(trained, expected, atol=1e-3)
    assert model.training  # the reference's eval mode was scoped
