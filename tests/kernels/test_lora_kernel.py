"""The fused LoRA layer equals peft's LoRA forward and backward; the Triton kernel equals the
unfused products under Triton's CPU interpreter (TRITON_INTERPRET=1), in fp32."""

import textwrap

import torch
from torch import nn
from peft import LoraConfig, get_peft_model

from tunesmith.kernels.lora import fuse_lora
from helpers import run_under_triton_interpreter


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 24, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def lora_block(dropout=0.0):
    torch.manual_seed(0)
    model = get_peft_model(Block(), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["up", "down"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)  # B starts at zero; move it so the low-rank path counts
    return model


def output_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def test_fused_layer_equals_peft():
    model, x = lora_block(), torch.randn(3, 7, 24)
    expected = output_and_grads(model, x)
    assert fuse_lora(model) == 2
    step = model.get_base_model().up(x).grad_fn  # the fused node, under the reshape back to (3, 7, 40)
    assert "LoRALinearFunction" in type(step.next_functions[0][0]).__name__
    got = output_and_grads(model, x)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
    assert got[2].keys() == expected[2].keys() and len(got[2]) == 4  # A and B of both layers, nothing else
    for name, grad in expected[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_layer_steps_aside_where_it_would_be_wrong():
    """A disabled adapter gives the base output; dropout keeps peft's forward (its randomness)."""
    model, x = lora_block(), torch.randn(2, 24)
    fuse_lora(model)
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(model(x), _base(model, x))
    dropped = lora_block(dropout=0.5)
    fuse_lora(dropped)
    dropped.train()
    torch.manual_seed(1)
    first = dropped(x)
    torch.manual_seed(2)
    assert not torch.allclose(first, dropped(x))  # peft's dropout still runs


def _base(model, x):
    block = model.get_base_model()
    return block.down.base_layer(torch.relu(block.up.base_layer(x)))


KERNEL_CHECK = textwrap.dedent("""
    import torch
    from tunesmith.kernels.lora import LoRALinearFunction, matmul_lowrank, triton
    assert triton is not None
    torch.manual_seed(0)
    M, K, N, R, s = 70, 50, 90, 5, 1.7  # none a multiple of the 64/32 tiles: the masks are exercised
    x = torch.randn(M, K, requires_grad=True)
    w, b = torch.randn(N, K), torch.randn(N)
    a, bb = torch.randn(R, K, requires_grad=True), torch.randn(N, R, requires_grad=True)
    u, v = torch.randn(M, R), torch.randn(R, N)
    out = matmul_lowrank(x.detach(), w.T, u, v, use_triton=True)  # transposed strides
    torch.testing.assert_close(out, x.detach() @ w.T + u @ v, rtol=1e-5, atol=1e-4)
    weights = torch.randn(M, N)
    fused = LoRALinearFunction.apply(x, w, b, a, bb, s, True)
    grads = torch.autograd.grad((fused * weights).sum(), [x, a, bb])
    plain = x @ w.T + b + s * (x @ a.T) @ bb.T
    expected = torch.autograd.grad((plain * weights).sum(), [x, a, bb])
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    print("kernel ok")
""")


def test_triton_kernel_equals_unfused_under_interpreter():
    run_under_triton_interpreter(KERNEL_CHECK)


def test_fused_layer_under_bf16_autocast_stays_near_fp32():
    """GPUs train under bf16 autocast by default: the fused layer casts as autocast casts nn.Linear,
    and its outputs and gradients stay within bf16 rounding of the fp32 ones (peft's own bf16
    forward strays up to 0.19 on this input gradient; the bound below is 2% of each tensor's largest value)."""
    model, x = lora_block(), torch.randn(3, 7, 24)
    exact = output_and_grads(model, x)
    fuse_lora(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = output_and_grads(model, x)
    assert got[0].dtype == torch.bfloat16
    for have, want in [(got[0], exact[0]), (got[1], exact[1])] + [(got[2][n], g) for n, g in exact[2].items()]:
        assert (have.float() - want).abs().max() <= 0.02 * want.abs().max()
    assert all(g.dtype == torch.float32 for g in got[2].values())  # the adapter's own dtype
