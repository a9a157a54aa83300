"""``mtpf-export``: checkpoint -> mobile bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtpf_runtime.manifest import LORA_DTYPES

from .bundle import DEFAULT_EMBEDDINGS, DEFAULT_FP32, ExportError, export_bundle, keep_fp32_help, read_sample_file
from .quantize import DEFAULT_SCHEME, SCHEMES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtpf-export",
        description=(
            "Export an mtpf checkpoint (backbone/ + adapters/ + heads/ + tasks/) to a bundle: "
            "backbone.onnx with LoRA inputs, one .onnx_adapter and head per task, tokenizer.json "
            "and manifest.json with sha256 of every file. The exported graph is checked against "
            "torch + PEFT on sample text before it replaces anything; a failed or interrupted "
            "export leaves the previous bundle in place."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint folder written by mtpf-adapt / pre-finetuning")
    p.add_argument("out", type=Path, help="bundle folder to write (replaced atomically if it exists)")
    p.add_argument("--precision", choices=["int8", "fp32"], default="int8",
                   help="backbone weights: dynamic INT8 (mobile default) or fp32 (reference)")
    p.add_argument("--quantization", choices=list(SCHEMES), default=DEFAULT_SCHEME,
                   help="INT8 scheme: per-token (weights per output column, each token's activations with "
                        "their own scale: a text's result does not depend on its batch), per-channel (ONNX "
                        "Runtime's dynamic INT8: one activation scale per batch), per-tensor, or static QDQ "
                        "(activation ranges calibrated on the sample texts)")
    p.add_argument("--keep-fp32", default=DEFAULT_FP32, metavar="SPEC",
                   help="INT8 only: weight MatMuls left in fp32: " + keep_fp32_help().replace("%", "%%")
                        + "; docs/quantization.md has the measurements behind the default")
    p.add_argument("--embeddings", choices=["fp32", "int8"], default=DEFAULT_EMBEDDINGS,
                   help="INT8 only: word-embedding table in fp32 or INT8 with one scale per row")
    p.add_argument("--adapter-dtype", choices=list(LORA_DTYPES), default=None,
                   help="the adapters' type (and the backbone's LoRA inputs'): float16 halves each task's "
                        "memory; a Cast makes them fp32 before the LoRA MatMuls. Default: float16 for an "
                        "int8 bundle, float32 for an fp32 one, and the bundle's own type with --add")
    p.add_argument("--task", action="append", dest="tasks", metavar="NAME",
                   help="export only this task (repeatable); default: every task in the checkpoint")
    p.add_argument("--add", action="store_true",
                   help="add/replace the tasks in the existing bundle OUT without rebuilding its backbone "
                        "(the checkpoint must share the bundle's backbone weights)")
    p.add_argument("--no-ort-format", action="store_true",
                   help="skip mobile/*.ort (ONNX Runtime Mobile format copies of the graphs)")
    p.add_argument("--sample-file", type=Path,
                   help="extra texts (one per line, UTF-8), added to the built-in sample texts: they rank the "
                        "MatMuls for --keep-fp32 auto:N, calibrate --quantization static, and feed the "
                        "torch-parity self-check. Texts like the app's own make auto:N keep the MatMuls "
                        "that matter for them")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        samples = read_sample_file(args.sample_file) if args.sample_file else None
    except ExportError as e:
        print(f"mtpf-export: {e}", file=sys.stderr)
        return 2
    try:
        export_bundle(args.checkpoint, args.out, precision=args.precision, scheme=args.quantization,
                      tasks=args.tasks, add_to=args.add, sample_texts=samples,
                      ort_format=not args.no_ort_format, keep_fp32=args.keep_fp32,
                      embeddings=args.embeddings, adapter_dtype=args.adapter_dtype)
    except (ExportError, ValueError, FileNotFoundError) as e:
        print(f"mtpf-export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtpf-export: interrupted; the previous bundle (if any) is unchanged", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
