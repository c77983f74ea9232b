"""Inference: quantization and kernels for fast `generate()` (`quantization`, `int8_vnni` with its C++ in `csrc/`),
exports to other engines (`ctranslate2_export`, `onnx_export`, the `export` command), the engines that decode with
them (`engines`), translating a file (`translate`: `hf-attention-translate`, `scripts/translate.py`, with n-best
lists in `output_formats`, sampling and minimum Bayes risk in `mbr`), scoring given translations (`scoring`) and
scoring a saved model on a test set (`evaluate`)."""

from .ctranslate2_export import export_ctranslate2
from .errors import ExportError
from .onnx_export import OnnxModelForSeq2SeqLM, export_onnx
from .quantization import optimize_for_inference

__all__ = ["ExportError", "OnnxModelForSeq2SeqLM", "export_ctranslate2", "export_onnx", "optimize_for_inference"]


def __getattr__(name: str):
    """The names of the former `hf_attention.inference` module, now `inference.quantization`."""
    from . import quantization

    if hasattr(quantization, name):
        return getattr(quantization, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
