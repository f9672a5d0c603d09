"""training.chunked_mlp: each decoder layer's MLP over a few tokens at a time, recomputed chunk by chunk in
backward. The same loss and gradients as the whole sequence at once, and far fewer bytes kept for backward."""

import torch

from tunesmith.config.schema import TrainingConfig
from tunesmith.models.fastpath import apply_speedups, chunk_mlp


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _saved_bytes(mlp, x):
    """Bytes the autograd graph keeps for backward in one MLP forward."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlp(x).sum()
    return sum(sizes)


def test_chunks_give_the_whole_sequence_s_loss_and_gradients_and_keep_less():
    model, ids = _tiny_llama(), torch.randint(0, 128, (1, 300))
    loss, grads = _loss_and_grads(model, ids)
    applied = apply_speedups(model, TrainingConfig(chunked_mlp=64, fused_lora="off", liger=False,
                                                   chunked_loss=False), padding_free=False)
    assert "chunked MLP (64 tokens) in 2 layers" in applied
    chunked_loss, chunked_grads = _loss_and_grads(model, ids)
    # The same sums over positions, split at other points: float order only.
    assert torch.allclose(chunked_loss, loss, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(chunked_grads[name], grad, atol=1e-6, rtol=1e-5), name
    mlp, x = model.model.layers[0].mlp, torch.randn(1, 300, 32, requires_grad=True)
    plain = _plain_copy(mlp, model.config)
    whole, kept = _saved_bytes(plain, x), _saved_bytes(mlp, x)
    print(f"\nMLP forward over 300 tokens keeps {whole:,} bytes for backward; in chunks of 64, {kept:,}")
    assert kept < whole / 3, "only the chunks' inputs are kept (the intermediates are recomputed)"
    with torch.no_grad():  # without gradients: chunks, nothing recomputed
        assert torch.allclose(mlp(x), plain(x), atol=1e-6)


def _plain_copy(mlp, config):
    plain = type(mlp)(config)
    plain.load_state_dict(mlp.state_dict())
    return plain


def test_short_sequences_and_a_second_call_leave_it_as_it_was():
    model = _tiny_llama()
    mlp = model.model.layers[0].mlp
    chunk_mlp(mlp, 64)
    wrapped = mlp.forward
    chunk_mlp(mlp, 128)  # a second apply changes the size, never wraps twice
    assert mlp.forward is wrapped and mlp._tunesmith_chunked == 128
    x = torch.randn(1, 100, 32)
    assert torch.equal(mlp(x), _plain_copy(mlp, model.config)(x)), "100 tokens: one chunk, the plain forward"


def test_a_deep_copy_runs_its_own_weights():
    """A DPO reference model is a deep copy of the policy made after the fast path is applied."""
    import copy

    model = _tiny_llama()
    mlp = model.model.layers[0].mlp
    chunk_mlp(mlp, 16)
    twin = copy.deepcopy(mlp)
    x = torch.randn(1, 40, 32)
    before = twin(x)
    with torch.no_grad():
        mlp.down_proj.weight.mul_(3.0)
    assert torch.equal(twin(x), before), "the copy must not read the original's weights"
    assert not torch.allclose(mlp(x), before)
