"""`frankenmoe export-gguf`: a merged MoE as one GGUF file for llama.cpp-based apps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from app.core.progress import format_bytes, run_job


def register(commands: Any) -> None:
    from app.core.export import IN_PROCESS_TYPES, QUANTIZER_TYPES

    export = commands.add_parser(
        "export-gguf",
        help="write a merged MoE as a GGUF file (llama.cpp, LM Studio, Ollama, GPT4All)",
        description=(
            "Writes MODEL (a Mixtral, Qwen2-MoE or Qwen3-MoE folder the merge made) as one GGUF file. "
            f"Types {', '.join(IN_PROCESS_TYPES)} are written here; K-quants and i-quants "
            f"({', '.join(QUANTIZER_TYPES)}) run llama.cpp's llama-quantize on an intermediate file. "
            "What llama.cpp computes differently from transformers is printed as a warning before writing."
        ),
    )
    export.add_argument("model", type=Path, metavar="MODEL", help="merged model folder")
    export.add_argument("out", type=Path, metavar="OUT.gguf", help="the GGUF file to write")
    export.add_argument(
        "--type", default="f16", choices=[*IN_PROCESS_TYPES, *QUANTIZER_TYPES], type=str.lower,
        help="tensor type (default f16); norms and routers stay f32 as in llama.cpp",
    )  # fmt: skip
    export.add_argument(
        "--quantize-with", metavar="PATH",
        help="llama.cpp's llama-quantize (the file or its folder), for K-quants; default: the one on PATH",
    )  # fmt: skip
    export.add_argument("--overwrite", action="store_true", help="replace OUT.gguf if it exists")
    export.add_argument("--quiet", action="store_true", help="no progress bars")
    export.set_defaults(handler=run_export_gguf)


def run_export_gguf(args: argparse.Namespace) -> int:
    from app.cli.progress import ProgressBars
    from app.core.export import COMPATIBLE_APPS, QUANTIZER_TYPES, export_gguf, find_llama_quantize, plan_gguf_export
    from app.core.problems import FrankenMoEError

    quantizer = find_llama_quantize(args.quantize_with)
    if args.quantize_with and quantizer is None:
        raise FrankenMoEError(
            f"--quantize-with {args.quantize_with} is not an executable llama-quantize",
            "point it at llama.cpp's llama-quantize (in build/bin of a llama.cpp build)",
        )
    needs_quantizer = args.type in QUANTIZER_TYPES
    plan = plan_gguf_export(args.model, args.out, args.type, quantizer=quantizer if needs_quantizer else None)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if plan.estimated_bytes and not any(p.is_error for p in plan.problems):
        print(f"{plan.architecture} GGUF, {args.type}: about {format_bytes(plan.estimated_bytes)}", file=sys.stderr)
    job = export_gguf(args.model, args.out, args.type, quantizer=quantizer, overwrite=args.overwrite)
    try:
        with ProgressBars(enabled=not args.quiet) as bars:
            result = run_job(job, bars)
    finally:
        job.close()  # an interrupt between records still removes the partial file
    print(f"wrote {result.out_path} ({format_bytes(result.bytes)}, {result.tensor_count} tensors)")
    print(COMPATIBLE_APPS)
    return 0
