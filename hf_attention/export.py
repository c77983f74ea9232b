"""`scripts/export.py ENGINE SOURCE DESTINATION` (console script `hf-attention-export`): a trained model for another
inference engine. Engines: `ctranslate2` (`--quantization int8`, ...; see ctranslate2_export.py)."""

import argparse
import sys

from .ctranslate2_export import QUANTIZATIONS, ExportError, export_ctranslate2


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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        output = export_ctranslate2(args.source, args.destination, args.quantization, args.overwrite)
    except (ExportError, OSError) as error:
        sys.exit(f"error: {error}")
    print(f"{args.source} -> {output} (ctranslate2, {args.quantization or 'float32'})")
