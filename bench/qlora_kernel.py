"""One QLoRA layer's forward + backward: peft's LoRA layer over bitsandbytes' 4-bit Linear4bit against
tunesmith's fused layer (kernels/qlora.py), on the same packed weight, adapter and input.

    python bench/qlora_kernel.py                       # CUDA: 4096x4096, 8192 tokens, bf16; CPU: 1024x1024, 512, fp32
    python bench/qlora_kernel.py --kernel triton       # the fused path's Triton kernel (CUDA)
    python bench/qlora_kernel.py --in 4096 --out 14336 --tokens 4096 --rank 64

Reported per path: tokens/s through the layer (forward and backward, the input's and the adapter's
gradients) at the median step after warm-up, in the fastest of a few alternating rounds (a shared
machine's load slows rounds, never speeds them), and peak memory: on CUDA the most allocated during
the timed steps over what was allocated before them; on CPU the peak RSS of a forked child that runs
only that path, which includes Python and torch themselves (compare the two, not their size). The
output's mean |y| and the norm of A's gradient are printed beside them: the two paths compute the
same layer. Numbers only: no assertions on time.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from forked import run_forked  # noqa: E402  (bench/ is on sys.path when a script there runs)


def build_layer(args: argparse.Namespace, device: str, dtype):
    """A peft LoRA layer over a 4-bit NF4 Linear4bit (double-quantised, as tunesmith's qlora loads them)."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    torch.manual_seed(0)
    plain = torch.nn.Linear(args.in_features, args.out_features, bias=False, dtype=dtype)
    base = bnb.nn.Linear4bit(args.in_features, args.out_features, bias=False, compute_dtype=dtype,
                             quant_type="nf4", compress_statistics=True)
    base.load_state_dict(plain.state_dict())
    base = base.to(device)  # bitsandbytes quantises on the move to a device
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0)
    layer = LoraLinear4bit(base, "default", config=config, r=args.rank, lora_alpha=2 * args.rank).to(device)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)  # B starts at zero; the speed does not care, the check does
    return layer.train()


def run_path(args: argparse.Namespace, path: str) -> dict:
    """Time ``path`` ("peft" or "fused") on a fresh layer; returns tokens/s, peak memory and an output checksum."""
    import torch

    from tunesmith.kernels.lora import fuse_lora

    device = args.device
    dtype = getattr(torch, args.dtype)
    layer = build_layer(args, device, dtype)
    if path == "fused":
        assert fuse_lora(layer, args.kernel) == 1
    torch.manual_seed(1)
    x = torch.randn(args.tokens, args.in_features, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(args.tokens, args.out_features, device=device, dtype=dtype)

    def step() -> torch.Tensor:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out = layer(x)  # (tokens, out)
        out.backward(grad)
        return out

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        out = step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        out = step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)  # a shared machine's stalls do not move the median
    result = {"tokens_per_s": args.tokens / seconds, "ms_per_step": 1000 * seconds,
              "checksum": float(out.detach().float().abs().mean()),
              "grad_a": float(layer.lora_A["default"].weight.grad.norm())}
    if device == "cuda":
        result["peak_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda where there is one)")
    parser.add_argument("--in", dest="in_features", type=int, default=None)
    parser.add_argument("--out", dest="out_features", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None, help="rows of the input (batch x sequence)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--kernel", choices=["blas", "triton"], default="blas", help="the fused path's kernel")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="children per path; the fastest is reported")
    args = parser.parse_args()
    if args.device is None:  # asked in a child: CUDA started in the parent would not survive the forks
        has_cuda = run_forked(lambda: {"cuda": __import__("torch").cuda.is_available()})["cuda"]
        args.device = "cuda" if has_cuda else "cpu"
    cuda = args.device == "cuda"
    args.in_features = args.in_features or (4096 if cuda else 1024)
    args.out_features = args.out_features or (4096 if cuda else 1024)
    args.tokens = args.tokens or (8192 if cuda else 512)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.steps = args.steps or 20
    print(f"QLoRA layer {args.in_features}x{args.out_features} (NF4), rank {args.rank}, {args.tokens} tokens, "
          f"{args.dtype} on {args.device}; fused kernel {args.kernel}; median of {args.steps} steps after "
          f"{args.warmup}, best of {args.rounds} rounds")
    results = {}
    for path in ("peft", "fused") * args.rounds:  # alternating rounds: a busy machine slows both alike
        result = run_forked(functools.partial(run_path, args, path))  # each in its own child: its own peak
        if "error" in result:
            raise SystemExit(f"{path}: {result['error']}")
        if path not in results or result["tokens_per_s"] > results[path]["tokens_per_s"]:
            results[path] = result
    for path, result in results.items():
        memory = f"peak {result['peak_mb']:.1f} MB allocated" if cuda else f"peak RSS {result['peak_rss_mb']:.1f} MB"
        print(f"  {path:5}  {result['tokens_per_s']:>12,.0f} tokens/s  {result['ms_per_step']:8.2f} ms/step  {memory}"
              f"  (|y| {result['checksum']:.5f}, |g_A| {result['grad_a']:.4f})")
    speed = results["fused"]["tokens_per_s"] / results["peft"]["tokens_per_s"]
    key = "peak_mb" if cuda else "peak_rss_mb"
    print(f"  fused / peft: {speed:.2f}x tokens/s, {results['fused'][key] / results['peft'][key]:.2f}x peak memory")


if __name__ == "__main__":
    main()
