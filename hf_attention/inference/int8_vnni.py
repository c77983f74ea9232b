"""The int8 matrix products of decoding steps, as operations torch.compile captures (`csrc/int8_vnni.cpp`): on CPUs
with AVX512-VNNI, `torch.ops.hf_attention.int8_vnni_matmul`; on the others with AVX2, `int8_avx2_matmul`.

A decoding step multiplies a few rows (one per sentence and beam) by every weight matrix, so its time is the time to
read the weights. torch's `_weight_int8pack_mm` (bf16 inputs times int8 weights) converts every weight to float before
multiplying; these kernels quantise each input row to int8 (symmetric, one scale per row, as dynamic quantisation does)
and multiply integers:
- VNNI: 4-way int8 dot products. For the 49 products of one Transformer-base token (26 MB of weights) on a 2-core
  AVX-512 CPU: 0.82–1.04 ms instead of 1.1 ms; greedy decoding of one sentence with int8 and compile, 6–7% faster.
- AVX2: weights widened to 16 bits, multiplied pairwise (vpmaddwd) with float32 rows, so that nothing goes through
  bf16, which AVX2 CPUs emulate (`_weight_int8pack_mm` there made compiled int8 decoding slower than fp32).

The C++ source is compiled on first use with `torch.utils.cpp_extension` (a C++ compiler and ninja, as torch.compile
needs on a CPU; ~10 s, cached across processes in `build_directory()`, one build at a time: `exclusive_build`), on
x86 CPUs only. Where the CPU lacks the instructions or
the build fails, `int8_vnni_available()` / `int8_avx2_available()` are False and `Int8Linear` uses torch's kernels.
"""

import contextlib
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # not on Windows, where the operations are not built either
    fcntl = None

from .. import hardware

SOURCE = Path(__file__).parent / "csrc" / "int8_vnni.cpp"
# How long a process waits for another's build of the operations before it gives up and uses torch's kernels.
BUILD_WAIT_SECONDS = 600
# "built": whether the operations are registered in this process; "vnni", "avx2": the last answers of *_available()
_state: dict = {}


def int8_vnni_available() -> bool:
    """Whether `torch.ops.hf_attention.int8_vnni_matmul` runs here: AVX512-VNNI in the capability map
    (`hardware.capabilities()`, which a mask or a test may limit) and in this CPU (a faked map never runs
    instructions the CPU lacks), and the operations built and loaded (once per process). Call it outside
    torch.compile first (`Int8Linear` does when built): tracing only reads the last answer."""
    return _available("vnni", lambda machine: machine.avx512_vnni)


def int8_avx2_available() -> bool:
    """Whether `torch.ops.hf_attention.int8_avx2_matmul` runs here: AVX2 in the capability map and in this CPU, and
    the operations built and loaded. Like `int8_vnni_available`, call it outside torch.compile first."""
    return _available("avx2", lambda machine: machine.avx2)


def _available(kernel: str, has_instructions) -> bool:
    if torch.compiler.is_compiling():
        return _state.get(kernel, False)
    usable = has_instructions(hardware.capabilities()) and has_instructions(hardware.detect())
    if usable and "built" not in _state:
        _state["built"] = _build_and_load()
    _state[kernel] = usable and _state["built"]
    return _state[kernel]


def build_directory() -> Path:
    """Where the operations are built: torch's extensions folder (`TORCH_EXTENSIONS_DIR`), one folder per torch
    version, so that a torch upgrade never loads a library built against another."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    folder = root / f"hf_attention_int8_torch{torch.__version__.replace('+', '_')}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def exclusive_build(folder: Path, wait_seconds: float = BUILD_WAIT_SECONDS) -> Iterator[bool]:
    """Yields whether this process may build in `folder`, waiting at most `wait_seconds` for another's build.

    torch's builder locks with a file whose existence is the lock (`lock`, a FileBaton): a build killed midway
    leaves it behind, and every later build waits for it forever. This lock is an `flock`, which the kernel releases
    when its holder dies; holding it, a `lock` file in the folder belongs to no live build and is removed."""
    if fcntl is None:
        yield True
        return
    with open(folder / "hf_attention.flock", "w") as handle:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    yield False
                    return
                time.sleep(0.2)
        try:
            (folder / "lock").unlink(missing_ok=True)
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_and_load() -> bool:
    path = os.environ.get("PATH", "")
    try:
        from torch.utils import cpp_extension

        folder = build_directory()
        with exclusive_build(folder) as building:
            if not building:
                raise TimeoutError(f"another process has been building in {folder} for {BUILD_WAIT_SECONDS} s")
            os.environ["PATH"] = os.pathsep.join(filter(None, [_ninja_folder(), path]))
            cpp_extension.load(
                name="hf_attention_int8_vnni",
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(folder),
                is_python_module=False,
            )
    except Exception as error:  # no compiler or ninja, a build that never ends: torch's int8 kernel does the work
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(
            f"hf_attention's int8 kernels (VNNI, AVX2) did not build ({first_line}); using torch's.", stacklevel=4
        )
        return False
    finally:
        os.environ["PATH"] = path
    torch.library.register_fake("hf_attention::int8_vnni_matmul")(_output_like)
    torch.library.register_fake("hf_attention::int8_avx2_matmul")(_output_like)
    return True


def _ninja_folder() -> str | None:
    """The folder of the pip package's ninja, which torch's builder runs by name: a virtual environment's python
    run by its path does not put that folder on PATH."""
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR


def _output_like(rows: torch.Tensor, weight: torch.Tensor, weight_scale, weight_sums=None) -> torch.Tensor:
    """The operation's output without computing it, for torch.compile's tracing."""
    return rows.new_empty(rows.shape[0], weight.shape[0], dtype=torch.float32)
