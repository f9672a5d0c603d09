"""The fused QLoRA layer (kernels/qlora.py) equals peft's QLoRA forward and backward and a plain fp32
computation over the dequantised weight; it keeps no dequantised weight between forward and backward;
it steps aside where it would be wrong; the Triton kernel does the same under Triton's CPU interpreter.

Each guarantee was seen to fail once with a planted defect: the scaling dropped from g_B in the
backward (the input, A and B gradients then differ from peft's and from the reference), the
dequantised weight saved for the backward (the weight is then alive after the forward), and the
dropout check removed from ``fusable`` (dropout's randomness then disappears), and the bias gradient
dropped (the biases then get none)."""

import gc
import textwrap
import weakref

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, has_avx512bf16

from tunesmith.adapters.apply import apply_method
from tunesmith.config.schema import MethodConfig, ModelConfig, QuantizationConfig
from tunesmith.kernels import qlora
from tunesmith.kernels.lora import fuse_lora
from tunesmith.models.load import load_model
from helpers import run_under_triton_interpreter

# fp32 against fp32: peft's path, ours and the reference multiply the same dequantised weight
# (bitsandbytes' dequantize_4bit is deterministic), so they differ only in the order of the fp32 sums
# (the low-rank term accumulated into the GEMM's output, s applied to B before the product rather
# than after): rounding of about 1e-7 of each value, and 64- to 128-long dot products.
EXACT = {"rtol": 1e-5, "atol": 1e-6}


def qlora_model(model_dir, method="qlora", dropout=0.0, compute_dtype="auto", bias="none"):
    """A tiny Llama loaded in 4-bit NF4 (in full for method lora) and given its adapter as ``tunesmith train``
    does; LoRA B moved off zero."""
    quantization = QuantizationConfig(compute_dtype=compute_dtype) if method != "lora" else None
    model = load_model(ModelConfig(name_or_path=str(model_dir), device="cpu"), quantization)
    torch.manual_seed(0)
    model = apply_method(model, MethodConfig.model_validate(
        {"type": method, "lora": {"dropout": dropout, "bias": bias}}))
    with torch.no_grad():  # LoRA B starts at zero; move it so the low-rank path counts
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    return model.train()


def qlora_layers(model):
    return {name: module for name, module in model.named_modules() if qlora.is_qlora_layer(module)}


def layer_output_and_grads(layer, x):
    """(output, grad of x, grad of A, grad of B) for a fixed weighting of the output."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = layer(x)  # (3, 7, out)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad


def reference_output_and_grads(layer, x):
    """The same, computed in fp32 from the dequantised weight with plain tensor ops (no peft, no fusion)."""
    weight = dequantize_4bit(layer.base_layer.weight, layer.base_layer.weight.quant_state).float()  # (out, in)
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)  # (R, in)
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)  # (out, R)
    x = x.clone().requires_grad_(True)
    out = x @ weight.T + layer.scaling["default"] * (x @ a.T) @ b.T
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), x.grad, a.grad, b.grad


def has_fused_node(out):
    """Whether the QLoRA node is within the few autograd nodes under ``out`` (reshape and casts sit above it)."""
    nodes = [out.grad_fn]
    for _ in range(4):
        if any("QLoRALinearFunction" in type(node).__name__ for node in nodes):
            return True
        nodes = [parent for node in nodes if node is not None for parent, _ in node.next_functions]
    return False


def test_fused_qlora_layers_equal_peft_and_the_dequantised_reference(tiny_model_dir):
    model = qlora_model(tiny_model_dir)
    layers = qlora_layers(model)
    torch.manual_seed(1)
    inputs = {name: torch.randn(3, 7, layer.in_features) for name, layer in layers.items()}
    expected = {name: layer_output_and_grads(layer, inputs[name]) for name, layer in layers.items()}
    assert fuse_lora(model) == len(layers) == 14  # 7 projections in each of 2 decoder layers
    for name, layer in layers.items():
        x = inputs[name]
        assert has_fused_node(layer(x))
        got = layer_output_and_grads(layer, x)
        reference = reference_output_and_grads(layer, x)
        for what, have, peft_value, plain_value in zip(("output", "x", "A", "B"), got, expected[name], reference):
            where = f"{name}, {what}"
            torch.testing.assert_close(have, peft_value, **EXACT, msg=lambda m, w=where: f"{w} against peft: {m}")
            torch.testing.assert_close(have, plain_value, **EXACT, msg=lambda m, w=where: f"{w} against fp32: {m}")


def test_backward_dequantises_again_and_keeps_no_weight(tiny_model_dir, monkeypatch):
    """QLoRA's memory point: no dequantised weight is alive between forward and backward."""
    model = qlora_model(tiny_model_dir)
    fuse_lora(model)
    layer = model.get_base_model().model.layers[0].mlp.down_proj
    weights = []
    dequantize = qlora.dequantize

    def recorded(*args):
        weight = dequantize(*args)
        weights.append(weakref.ref(weight))
        return weight

    monkeypatch.setattr(qlora, "dequantize", recorded)
    x = torch.randn(3, 7, layer.in_features, requires_grad=True)
    out = layer(x)
    gc.collect()
    assert len(weights) == 1 and weights[0]() is None  # dropped when the forward returned
    out.sum().backward()
    assert len(weights) == 2 and weights[1]() is None  # unpacked again for g_x, dropped again
    assert layer.lora_A["default"].weight.grad is not None and x.grad is not None
    layer(x.detach()).sum().backward()
    assert len(weights) == 3  # no g_x wanted: no second dequantisation


def test_fused_qlora_steps_aside_where_it_would_be_wrong(tiny_model_dir):
    """A disabled adapter gives the base output; dropout and DoRA keep peft's forward."""
    model = qlora_model(tiny_model_dir)
    fuse_lora(model)
    layer = model.get_base_model().model.layers[1].self_attn.q_proj
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)  # with grad: bitsandbytes keeps its layout
    with model.disable_adapter():
        disabled = layer(x)
    torch.testing.assert_close(disabled, layer.base_layer(x), **EXACT)
    assert not torch.allclose(disabled, layer(x), atol=1e-3)  # the adapter does change the output

    dropped = qlora_model(tiny_model_dir, dropout=0.5)
    fuse_lora(dropped)
    layer = dropped.get_base_model().model.layers[0].mlp.up_proj
    torch.manual_seed(1)
    first = layer(x)
    assert not has_fused_node(first)
    torch.manual_seed(2)
    assert not torch.allclose(first, layer(x))  # peft's dropout still runs

    dora = qlora_model(tiny_model_dir, method="dora")
    layer = dora.get_base_model().model.layers[0].mlp.up_proj
    expected = layer(x)
    assert fuse_lora(dora) == 14  # routed, yet every call steps aside
    got = layer(x)
    assert not has_fused_node(got)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def biased_model_dir(tmp_path_factory):
    """A 1-layer random Llama whose projections all have biases (as Qwen2's q, k and v do)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("biased-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_fused_layers_add_and_train_the_base_bias(biased_model_dir, method):
    """With ``lora.bias: all`` the base biases train: the fused layers (plain and 4-bit) add them and give
    them peft's gradients. (Before the shared backward returned g_bias, the fused layers dropped it: the
    planted defect, seen to fail here.)"""
    model = qlora_model(biased_model_dir, method=method, bias="all")
    ids = torch.randint(0, 128, (2, 9))

    def logits_and_grads():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits  # (2, 9, vocab)
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = logits_and_grads()
    assert fuse_lora(model) == 7
    got = logits_and_grads()
    assert any(".bias" in name for name in expected[1]) and got[1].keys() == expected[1].keys()
    torch.testing.assert_close(got[0], expected[0], **EXACT)
    for name, grad in expected[1].items():  # through a whole decoder layer: rounding of 1e-6 of the largest value
        torch.testing.assert_close(got[1][name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()), msg=name)


@pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights for CPU inference only on "
                                                 "CPUs with AVX512-BF16")
def test_weight_repacked_for_cpu_inference_keeps_peft_forward(tiny_model_dir):
    """bitsandbytes repacks a weight for its CPU kernel at a no-grad eval call; dequantize_4bit cannot read it."""
    model = qlora_model(tiny_model_dir)
    fuse_lora(model)
    layer = model.get_base_model().model.layers[0].mlp.up_proj
    x = torch.randn(2, 5, layer.in_features)
    expected = layer(x).detach()
    model.eval()
    with model.disable_adapter(), torch.no_grad():
        layer(x)  # peft's forward: bitsandbytes repacks the weight here
    assert layer.base_layer.weight.quant_state.packing_format_for_cpu
    got = layer(x.requires_grad_(True))
    assert not has_fused_node(got)
    torch.testing.assert_close(got, expected, rtol=0.02, atol=0.05)  # its CPU kernel computes in bf16


@pytest.mark.parametrize("how", ["autocast", "compute_dtype"])
def test_fused_qlora_in_bf16_stays_near_fp32(tiny_model_dir, how):
    """GPUs compute QLoRA in bf16, under autocast or as the layer's compute_dtype: the fused layer's
    outputs and gradients stay within bf16 rounding of the fp32 reference (the bound: 2% of each
    tensor's largest value, as for the plain fused layer), and come back in the dtype each case promises."""
    model = qlora_model(tiny_model_dir, compute_dtype="bfloat16" if how == "compute_dtype" else "auto")
    fuse_lora(model)
    layer = model.get_base_model().model.layers[0].mlp.gate_proj
    x = torch.randn(3, 7, layer.in_features)
    exact = reference_output_and_grads(layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16) if how == "autocast" else torch.autocast("cpu", enabled=False):
        assert has_fused_node(layer(x))
        got = layer_output_and_grads(layer, x)
    assert got[0].dtype == (torch.bfloat16 if how == "autocast" else torch.float32)  # as nn.Linear / Linear4bit
    for have, want in zip(got, exact):
        assert (have.float() - want).abs().max() <= 0.02 * want.abs().max()
    assert got[1].dtype == torch.float32 and got[2].dtype == got[3].dtype == torch.float32  # x's and the adapter's


KERNEL_CHECK = textwrap.dedent("""
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    from tunesmith.kernels.qlora import QLoRALinearFunction
    torch.manual_seed(0)
    M, K, N, R, s = 70, 64, 90, 5, 1.7  # M, N not multiples of the 64-wide tiles: the masks are exercised
    packed, state = quantize_4bit(torch.randn(N, K), quant_type="nf4", compress_statistics=True)
    w = dequantize_4bit(packed, state)  # (N, K)
    x = torch.randn(M, K, requires_grad=True)
    b = torch.randn(N)
    a, bb = torch.randn(R, K, requires_grad=True), torch.randn(N, R, requires_grad=True)
    weights = torch.randn(M, N)
    fused = QLoRALinearFunction.apply(x, packed, state, b, a, bb, s, True)
    grads = torch.autograd.grad((fused * weights).sum(), [x, a, bb])
    plain = x @ w.T + b + s * (x @ a.T) @ bb.T
    expected = torch.autograd.grad((plain * weights).sum(), [x, a, bb])
    # fp32 throughout; the sums run in other orders (tiles, s applied before or after a product), and the
    # gradients (up to about 150 here) hold elements that cancel to near 0: rounding is bounded by the
    # tensor's scale, 1e-5 of its largest value, not by each element's size.
    for got, want in zip([fused, *grads], [plain, *expected]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    print("kernel ok")
""")


def test_triton_qlora_equals_unfused_under_interpreter():
    run_under_triton_interpreter(KERNEL_CHECK)
