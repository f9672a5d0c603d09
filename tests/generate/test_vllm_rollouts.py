"""grpo.engine vllm: vLLM (its CPU build, from .venv-vllm) samples with the policy's LoRA adapter, synced
(under a new name) after each change of the weights. In float32 its greedy completions are the training model's own, before
and after an update; seeds from the torch RNG make sampled completions reproducible.

Skips, saying why, where vLLM's environment is not built (`make vllm`)."""

from __future__ import annotations

import pytest
import torch

from tunesmith.generate import vllm
from tunesmith.generate.rollout import HFRollouts, VLLMRollouts
from tunesmith.generate.sample import SamplingConfig


@pytest.mark.slow
def test_vllm_samples_with_the_policys_current_adapter(embedded_dir, tokenizer, tmp_path):
    try:
        python = vllm.find_python()
    except vllm.VLLMError as err:
        pytest.skip(str(err))
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in ("Name a color.", "Tell me about bees.")]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    engine = VLLMRollouts(tokenizer, str(embedded_dir), 8, 256, tmp_path / "vllm.log", python,
                          ["--dtype", "float32"], max_batch_size=16)
    try:
        before = engine.sample(model, prompts, greedy)
        assert before == HFRollouts(tokenizer).sample(model, prompts, greedy) and engine.syncs == 1
        # A real update by a fused optimizer step, which does not count as an in-place change on the tensors'
        # version counters (a sync keyed on them missed it).
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, fused=True)
        for parameter in optimizer.param_groups[0]["params"]:
            parameter.grad = torch.randn_like(parameter)
        optimizer.step()
        after = engine.sample(model, prompts, greedy)
        assert engine.syncs == 2 and after != before and engine.name == "policy-1"
        assert [p.name for p in engine.folder.iterdir()] == ["adapter-1"]  # the previous adapter is gone
        assert after == HFRollouts(tokenizer).sample(model, prompts, greedy)
        sampled = SamplingConfig(max_new_tokens=8, temperature=1.0)
        torch.manual_seed(3)
        first = engine.sample(model, prompts * 2, sampled)
        torch.manual_seed(3)
        assert engine.sample(model, prompts * 2, sampled) == first and engine.syncs == 2  # no update, no sync
        assert first[:2] != first[2:]  # copies of a prompt get their own seeds
        folder = engine.folder
    finally:
        engine.close()
    assert engine.process is None and not folder.exists()
