"""The fast path (padding-free packing, per-row attention, the fused LoRA layers and the fused
linear cross-entropy) computes the same loss and gradients as the reference path (padded batch,
transformers' SDPA, peft's LoRA forward, full logits), and packed rows do not see each other."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tunesmith.adapters.apply import apply_method
from tunesmith.config.schema import MethodConfig
from tunesmith.data.collate import collate_batch
from tunesmith.data.pack import collate_padding_free
from tunesmith.data.tokenize import tokenize_messages
from tunesmith.models.load import load_model
from tunesmith.config.schema import ModelConfig, QuantizationConfig, TrainingConfig
from tunesmith.losses.chunked import LinearCrossEntropy
from tunesmith.models.varlen import NAME as VARLEN
from tunesmith.models.fastpath import apply_speedups, decoder_and_head
from tunesmith.recipes.sft import SFTObjective
from helpers import counting_rows


def rows(tokenizer, count=6):
    return [{"input_ids": t.input_ids, "labels": t.labels} for t in
            (tokenize_messages(tokenizer, r["messages"], 64) for r in counting_rows(count))]


def model_for(method, tiny_model_dir):
    quantization = QuantizationConfig() if method == "qlora" else None
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu"), quantization)
    torch.manual_seed(0)
    model = apply_method(model, MethodConfig.model_validate({"type": method, "lora": {"dropout": 0.0}}))
    with torch.no_grad():  # LoRA B starts at zero; move it so the adapter path is exercised
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return model


def loss_and_grads(model, objective, batch):
    model.zero_grad(set_to_none=True)
    loss = objective.loss_sum(model, batch) / objective.units(batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_fast_path_equals_reference(tiny_model_dir, tokenizer, method):
    model = model_for(method, tiny_model_dir)
    model.train()
    assert decoder_and_head(model) is not None  # the fast path really runs
    batch_rows = rows(tokenizer)
    reference = loss_and_grads(model, SFTObjective(chunked=False), collate_batch(batch_rows, tokenizer.pad_token_id))
    applied = apply_speedups(model, TrainingConfig(), padding_free=True)
    assert any("sdpa_varlen" in a for a in applied)
    assert any("fused LoRA" in a for a in applied) == (method in ("lora", "qlora"))  # 4-bit: kernels/qlora.py
    fast = loss_and_grads(model, SFTObjective(chunked=True), collate_padding_free(batch_rows))
    assert fast[0] == pytest.approx(reference[0], abs=1e-5)
    assert reference[1].keys() == fast[1].keys() and reference[1]
    for name, grad in reference[1].items():
        torch.testing.assert_close(fast[1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", VARLEN])
def test_packed_rows_have_the_losses_they_have_alone(tiny_model_dir, tokenizer, attention):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.set_attn_implementation(attention)
    batch_rows = rows(tokenizer, 4)
    packed = collate_padding_free(batch_rows)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                       use_cache=False).logits[0]  # (T, vocab); a cache would hide the row boundaries
        start = 0
        for row in batch_rows:
            length = len(row["input_ids"])
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]  # (length, vocab)
            labels = torch.tensor(row["labels"][1:])
            mine = F.cross_entropy(logits[start:start + length - 1], labels, ignore_index=-100)
            expected = F.cross_entropy(alone[:-1], labels, ignore_index=-100)
            assert float(mine) == pytest.approx(float(expected), abs=1e-5)
            start += length
    # Without the restarting position ids the rows would attend to each other: the test can fail.
    with torch.no_grad():
        leaked = model(input_ids=packed["input_ids"], use_cache=False).logits[0]
    second = len(batch_rows[0]["input_ids"])
    assert not torch.allclose(leaked[second:second + 3], logits[second:second + 3], atol=1e-3)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_matches_autograd(bias):
    """Gradients taken in the forward equal autograd's through full logits, for the hidden states,
    the head's weight and bias, scaled by whatever multiplies the loss afterwards."""
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, requires_grad=True)
    head = torch.nn.Linear(8, 40, bias=bias)
    targets = torch.randint(0, 40, (13,))
    expected = F.cross_entropy(head(hidden), targets, reduction="sum") * 0.37
    wanted = torch.autograd.grad(expected, [hidden, *head.parameters()])
    got = LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, 5) * 0.37  # 3 chunks
    grads = torch.autograd.grad(got, [hidden, *head.parameters()])
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    for want, have in zip(wanted, grads):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)


def test_rollouts_generate_with_the_plain_forward_and_the_fast_path_comes_back(tiny_model_dir, tokenizer):
    """plain_forward: inside, every fused LoRA layer runs peft's own forward and attention is transformers'
    sdpa (what plain transformers + peft generate with); after, the fast path is back, an error included.
    Sampling through it gives the tokens the fast path gives (the same sums, other kernels)."""
    from tunesmith.generate.rollout import HFRollouts
    from tunesmith.generate.sample import SamplingConfig
    from tunesmith.models.fastpath import plain_forward

    model = model_for("lora", tiny_model_dir)
    apply_speedups(model, TrainingConfig(), padding_free=True)
    fused = [m for m in model.modules() if hasattr(m, "_peft_forward")]
    assert fused and model.config._attn_implementation == VARLEN
    fast_forwards = [m.forward for m in fused]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in ("Count to 3.", "Count to 5, please.")]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    with plain_forward(model):
        assert all(m.forward == m._peft_forward for m in fused) and model.config._attn_implementation == "sdpa"
    assert [m.forward for m in fused] == fast_forwards and model.config._attn_implementation == VARLEN
    with pytest.raises(RuntimeError), plain_forward(model):
        raise RuntimeError("generation failed")
    assert [m.forward for m in fused] == fast_forwards and model.config._attn_implementation == VARLEN
    from tunesmith.generate.sample import sample_batch
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    assert HFRollouts(tokenizer).sample(model, prompts, greedy) == sample_batch(model, tokenizer, prompts, greedy)
