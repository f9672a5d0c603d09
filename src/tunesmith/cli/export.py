"""`tunesmith export RUN --to hf --out DIR [--dtype ...]`"""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("export", help="merge a run and write a plain transformers folder, checked "
                                                "against the trained model")
    parser.add_argument("target", help="a run folder, an adapter folder or a model folder")
    parser.add_argument("--to", choices=["hf"], default="hf")
    parser.add_argument("--out", required=True, help="the folder to write (replaced atomically)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--no-parity", action="store_true", help="skip the parity check")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tunesmith.export.hf import export_hf

    result = export_hf(args.target, Path(args.out), DTYPES[args.dtype], parity=not args.no_parity)
    action = "merged and wrote" if result.merged else "wrote"
    print(f"{action} {result.out} ({args.dtype})")
    if result.parity is not None:
        verdict = "passed" if result.parity_enforced else "reported only (QLoRA: merged into the de-quantized base)"
        print(f"parity {verdict}: {result.parity.summary()}")
    return 0
