"""`torch.ops.hf_attention.int8_vnni_matmul`: the matrix product of a decoding step with int8 weights, on CPUs with
AVX512-VNNI, as an operation torch.compile captures (`csrc/int8_vnni.cpp`).

A decoding step multiplies a few rows (one per sentence and beam) by every weight matrix, so its time is the time to
read the weights. torch's `_weight_int8pack_mm` (bf16 inputs times int8 weights) converts every weight to float before
multiplying; this kernel quantises each input row to int8 (symmetric, one scale per row, as dynamic quantisation does)
and multiplies with VNNI's int8 dot products. For the 49 products of one Transformer-base token (26 MB of weights) on a
2-core AVX-512 CPU: 0.82–1.04 ms instead of 1.1 ms; greedy decoding of one sentence with int8 and compile, 6–7% faster.

The C++ source is compiled on first use with `torch.utils.cpp_extension` (a C++ compiler and ninja, as torch.compile
needs on a CPU; ~10 s, cached by torch across processes). Where the CPU lacks AVX512-VNNI or the build fails,
`int8_vnni_available()` is False and `Int8Linear` uses `torch._weight_int8pack_mm`.
"""

import os
import warnings
from pathlib import Path

import torch

from .. import hardware

SOURCE = Path(__file__).parent / "csrc" / "int8_vnni.cpp"
# "built": whether the operation is registered in this process; "usable": the last answer of int8_vnni_available()
_state: dict = {}


def int8_vnni_available() -> bool:
    """Whether `torch.ops.hf_attention.int8_vnni_matmul` runs here: AVX512-VNNI in the capability map
    (`hardware.capabilities()`, which a mask or a test may limit) and in this CPU (a faked map never runs
    instructions the CPU lacks), and the operation built and loaded (once per process). Call it outside torch.compile
    first (`Int8Linear` does when built): tracing only reads the last answer."""
    if torch.compiler.is_compiling():
        return _state.get("usable", False)
    usable = hardware.capabilities().avx512_vnni and hardware.detect().avx512_vnni
    if usable and "built" not in _state:
        _state["built"] = _build_and_load()
    _state["usable"] = usable and _state["built"]
    return _state["usable"]


def _build_and_load() -> bool:
    path = os.environ.get("PATH", "")
    try:
        from torch.utils import cpp_extension

        os.environ["PATH"] = os.pathsep.join(filter(None, [_ninja_folder(), path]))
        cpp_extension.load(
            name="hf_attention_int8_vnni",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # no compiler or ninja: torch's int8 kernel does the work
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"hf_attention's int8 VNNI kernel did not build ({first_line}); using torch's.", stacklevel=3)
        return False
    finally:
        os.environ["PATH"] = path
    torch.library.register_fake("hf_attention::int8_vnni_matmul")(_output_like)
    return True


def _ninja_folder() -> str | None:
    """The folder of the pip package's ninja, which torch's builder runs by name: a virtual environment's python
    run by its path does not put that folder on PATH."""
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR


def _output_like(rows: torch.Tensor, weight: torch.Tensor, weight_scale, weight_sums) -> torch.Tensor:
    """The operation's output without computing it, for torch.compile's tracing."""
    return rows.new_empty(rows.shape[0], weight.shape[0], dtype=torch.float32)
