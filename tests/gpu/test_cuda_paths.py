"""The training fast path on a CUDA device: what the CPU tests cannot reach.

Run where a GPU is: ``pytest tests/gpu -q``. Each test skips with a reason on a machine without
CUDA (CI has none); on a GPU machine they check, against the plain path on the same device:
the Triton fused-LoRA kernel compiled for the GPU (not the interpreter), per-row attention,
Liger's kernels and fused linear cross-entropy when liger-kernel is installed, activation
offloading to pinned host memory, and a bf16 step under autocast.
"""

from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from tunesmith.config.schema import TrainingConfig
from tunesmith.data.collate import collate_batch
from tunesmith.data.pack import collate_padding_free
from tunesmith.kernels.lora import LoRALinearFunction, matmul_lowrank, triton_usable
from tunesmith.losses.chunked import chunked_loss_sum
from tunesmith.losses.sft import sft_loss_sum
from tunesmith.models.fastpath import apply_speedups
from tunesmith.recipes.sft import SFTObjective

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
CUDA = torch.device("cuda")
VOCAB = 512


def tiny_llama(lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.1, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(CUDA)
    if lora:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
        with torch.no_grad():  # B starts at zero; move it so the adapter path counts
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.05)
    return model.train()


def batch_rows(count: int = 5) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    rows = []
    for index in range(count):
        length = 20 + 13 * index
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 6 + ids[6:]})
    return rows


def loss_and_grads(model, objective, batch, offload=False):
    model.zero_grad(set_to_none=True)
    batch = {k: v.to(CUDA) for k, v in batch.items()}
    with torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else nullcontext():
        loss = objective.loss_sum(model, batch) / objective.units(batch)
        loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got, want, rtol, atol):
    assert got[0] == pytest.approx(want[0], rel=rtol, abs=atol)
    assert got[1].keys() == want[1].keys() and want[1]
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_compiled_for_the_gpu_equals_unfused(dtype):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    M, K, N, R, s = 300, 200, 260, 16, 2.0  # not multiples of the tiles
    x = torch.randn(M, K, device=CUDA, dtype=dtype, requires_grad=True)
    w, b = torch.randn(N, K, device=CUDA, dtype=dtype) / 10, torch.randn(N, device=CUDA, dtype=dtype)
    a = (torch.randn(R, K, device=CUDA, dtype=dtype) / 10).requires_grad_(True)
    bb = (torch.randn(N, R, device=CUDA, dtype=dtype) / 10).requires_grad_(True)
    assert triton_usable(x)
    tol = {"rtol": 1e-4, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    u, v = torch.randn(M, R, device=CUDA, dtype=dtype), torch.randn(R, N, device=CUDA, dtype=dtype)
    want = (x.detach().float() @ w.float().T + u.float() @ v.float()).to(dtype)
    torch.testing.assert_close(matmul_lowrank(x.detach(), w.T, u, v, use_triton=True), want, **tol)
    weights = torch.randn(M, N, device=CUDA, dtype=dtype)
    fused = LoRALinearFunction.apply(x, w, b, a, bb, s, True)
    grads = torch.autograd.grad((fused * weights).float().sum(), [x, a, bb])
    plain = x @ w.T + b + s * (x @ a.T) @ bb.T
    expected = torch.autograd.grad((plain * weights).float().sum(), [x, a, bb])
    torch.testing.assert_close(fused, plain, **tol)
    for got, wanted in zip(grads, expected):
        scale = wanted.abs().max().item()
        torch.testing.assert_close(got / scale, wanted / scale, **tol)


@pytest.mark.parametrize("kernel", ["blas", "triton"])
def test_lora_fast_path_equals_reference_on_cuda(kernel):
    """fp32, Liger off: the same numbers as on CPU, with per-row attention and the fused layers."""
    if kernel == "triton":
        pytest.importorskip("triton")
    model, rows = tiny_llama(lora=True), batch_rows()
    reference = loss_and_grads(model, SFTObjective(chunked=False), collate_batch(rows, 0))
    applied = apply_speedups(model, TrainingConfig(fused_lora=kernel, liger=False), padding_free=True)
    assert any("sdpa_varlen" in a for a in applied) and any(f"fused LoRA ({kernel})" in a for a in applied)
    fast = loss_and_grads(model, SFTObjective(chunked=True, liger=False), collate_padding_free(rows))
    assert_same(fast, reference, rtol=1e-4, atol=1e-5)


def test_full_fast_path_with_liger_equals_reference():
    """Liger's RMSNorm, RoPE and SwiGLU on the model and its fused linear cross-entropy for the loss."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is the [gpu] extra")
    model, rows = tiny_llama(lora=False), batch_rows()
    reference = loss_and_grads(model, SFTObjective(chunked=False), collate_batch(rows, 0))
    applied = apply_speedups(model, TrainingConfig(liger=True), padding_free=True)
    assert any("Liger" in a for a in applied), applied
    fast = loss_and_grads(model, SFTObjective(chunked=True, liger=True), collate_padding_free(rows))
    assert_same(fast, reference, rtol=2e-3, atol=2e-4)


def test_liger_fused_cross_entropy_equals_ours():
    pytest.importorskip("liger_kernel", reason="liger-kernel is the [gpu] extra")
    torch.manual_seed(0)
    head = torch.nn.Linear(64, VOCAB, bias=False).to(CUDA)
    hidden = torch.randn(3, 40, 64, device=CUDA, requires_grad=True)
    labels = torch.randint(0, VOCAB, (3, 40), device=CUDA)
    labels[:, :7] = -100
    want = sft_loss_sum(head(hidden), labels)
    want_grad = torch.autograd.grad(want, [hidden, head.weight])
    got = chunked_loss_sum(hidden, head, labels, liger=True)
    got_grad = torch.autograd.grad(got, [hidden, head.weight])
    assert float(got) == pytest.approx(float(want), rel=1e-4)
    for g, w in zip(got_grad, want_grad):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)


def test_offloaded_activations_give_the_same_step():
    model, rows = tiny_llama(lora=True), batch_rows()
    apply_speedups(model, TrainingConfig(liger=False), padding_free=True)
    objective, batch = SFTObjective(chunked=True, liger=False), collate_padding_free(rows)
    plain = loss_and_grads(model, objective, batch)
    offloaded = loss_and_grads(model, objective, batch, offload=True)
    assert_same(offloaded, plain, rtol=0, atol=0)


def test_bf16_autocast_step_stays_near_fp32():
    model, rows = tiny_llama(lora=True), batch_rows()
    apply_speedups(model, TrainingConfig(), padding_free=True)
    objective, batch = SFTObjective(chunked=True), collate_padding_free(rows)
    full = loss_and_grads(model, objective, batch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = loss_and_grads(model, objective, batch)
    assert half[0] == pytest.approx(full[0], rel=2e-2)
    for name, grad in full[1].items():
        cosine = torch.nn.functional.cosine_similarity(half[1][name].float().flatten(), grad.flatten(), dim=0)
        assert cosine > 0.98, name


def test_packed_rows_in_bf16_take_flash_varlen_and_match_each_row_alone(monkeypatch):
    from tunesmith.models import varlen

    if varlen.varlen_attn is None:
        pytest.skip("torch.nn.attention.varlen needs torch >= 2.10")
    calls, original = [], varlen._flash_varlen
    monkeypatch.setattr(varlen, "_flash_varlen", lambda *a: calls.append(1) or original(*a))
    model, rows = tiny_llama(lora=False).to(torch.bfloat16).eval(), batch_rows()
    model.set_attn_implementation(varlen.NAME)
    packed = collate_padding_free(rows)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"].to(CUDA), position_ids=packed["position_ids"].to(CUDA),
                       use_cache=False).logits[0].float()
        model.set_attn_implementation("sdpa")
        start = 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row["input_ids"]], device=CUDA)).logits[0].float()
            mine = logits[start:start + len(row["input_ids"])]
            assert (mine - alone).abs().max() <= 0.05 * alone.abs().max()
            start += len(row["input_ids"])
    assert len(calls) == 2  # one call per layer for all rows



def test_plain_adamw_runs_fused_on_the_gpu():
    """training.optimizer adamw is torch's fused kernel on a GPU (not with an offload)."""
    from tunesmith.train.optim import build_optimizer

    model = torch.nn.Linear(8, 8).to(CUDA)
    assert build_optimizer(model, TrainingConfig()).defaults["fused"] is True
    offloaded = TrainingConfig(distributed="fsdp", fsdp={"cpu_offload": True})
    assert not build_optimizer(model, offloaded).defaults["fused"]
