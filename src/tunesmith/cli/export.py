"""`tunesmith export RUN --to hf|gguf|ollama|bnb-4bit|bnb-8bit --out DIR`"""

from __future__ import annotations

import argparse
from pathlib import Path

from tunesmith.config.names import EXPORT_DTYPES as DTYPES
from tunesmith.config.names import EXPORT_TARGETS as TARGETS


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("export", help="merge a run and write it as a transformers folder, GGUF (with an "
                                                "Ollama Modelfile) or bitsandbytes folder, checked against the "
                                                "trained model")
    parser.add_argument("target", help="a run folder, an adapter folder, a model folder or registry:NAME@ALIAS")
    parser.add_argument("--to", choices=TARGETS, default="hf")
    parser.add_argument("--out", required=True, help="the folder to write (replaced atomically, only if parity holds)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="--to hf: the weights' dtype")
    parser.add_argument("--quant", default="f16",
                        help="--to gguf/ollama: f32, f16, bf16, q8_0 or q4_0; several comma-separated give one file "
                             "each (the Modelfile uses the first)")
    parser.add_argument("--no-parity", action="store_true", help="skip the parity check")
    parser.set_defaults(handler=run)


def _print_parity(kind: str, report, enforced: bool) -> None:
    if report is not None:
        verdict = "passed" if enforced else "reported only (QLoRA: merged into the de-quantized base)"
        print(f"parity {kind} {verdict}: {report.summary()}")


def run(args: argparse.Namespace) -> int:
    from tunesmith.config.commands import ExportCommandConfig, validate_command
    from tunesmith.targets import resolve_target

    flags = validate_command(ExportCommandConfig, args, "export")  # every flag, before anything loads
    target = resolve_target(flags.target)  # looked at once; registry:NAME@ALIAS -> the version's folder
    out, parity = Path(flags.out), not flags.no_parity
    if flags.to in ("gguf", "ollama"):
        from tunesmith.export.gguf import export_gguf

        result, files = export_gguf(target, out, flags.quant, parity, ollama=flags.to == "ollama")
        for file in files:
            print(f"wrote {file.path} ({file.quant})")
            _print_parity(file.quant, file.parity, result.parity_enforced)
        if flags.to == "ollama":
            print(f"wrote {out / 'Modelfile'}; create the model with: ollama create NAME -f {out / 'Modelfile'}")
        return 0
    if flags.to.startswith("bnb-"):
        from tunesmith.export.bnb import export_bnb

        result = export_bnb(target, out, int(flags.to[4]), parity)
    else:
        from tunesmith.export.hf import export_hf

        result = export_hf(target, out, DTYPES[flags.dtype], parity=parity)
    action = "merged and wrote" if result.merged else "wrote"
    print(f"{action} {result.out} ({result.dtype})")
    _print_parity(result.dtype, result.parity, result.parity_enforced)
    return 0
