"""`scripts/export.py ENGINE SOURCE DESTINATION` (console script `hf-attention-export`): a trained model for another
inference engine. Engines: `ctranslate2` (`--quantization int8`, ...; see ctranslate2_export.py) and `onnx` (encoder,
decoder and decoder-with-past graphs; see onnx_export.py)."""

import argparse
import sys

from .ctranslate2_export import QUANTIZATIONS, export_ctranslate2
from .errors import ExportError
from .onnx_export import export_onnx


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="export.py", description=__doc__.splitlines()[0])
    engines = parser.add_subparsers(dest="engine", required=True, metavar="ENGINE")
    ct2 = engines.add_parser("ctranslate2", help="A CTranslate2 model folder (needs hf_attention[ctranslate2]).")
    ct2.add_argument("source", help="The hf_attention model folder (with its tokenizer).")
    ct2.add_argument("destination", help="The CTranslate2 model folder to write.")
    ct2.add_argument(
        "--quantization",
        choices=[name for name in QUANTIZATIONS if name],
        default=None,
        help="CTranslate2's weight type (default: float32).",
    )
    ct2.add_argument("--overwrite", action="store_true", help="Replace DESTINATION once the new folder is complete.")
    onnx = engines.add_parser("onnx", help="ONNX graphs for onnxruntime (needs hf_attention[onnx]).")
    onnx.add_argument("source", help="The hf_attention model folder (with its tokenizer).")
    onnx.add_argument("destination", help="The folder to write the graphs, configs and tokenizer to.")
    onnx.add_argument("--overwrite", action="store_true", help="Replace DESTINATION once the new folder is complete.")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.engine == "onnx":
            output, detail = export_onnx(args.source, args.destination, args.overwrite), "encoder, decoder, with past"
        else:
            output = export_ctranslate2(args.source, args.destination, args.quantization, args.overwrite)
            detail = args.quantization or "float32"
    except (ExportError, OSError) as error:
        sys.exit(f"error: {error}")
    print(f"{args.source} -> {output} ({args.engine}: {detail})")
