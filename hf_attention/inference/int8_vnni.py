"""The int8 matrix products of decoding steps, as operations torch.compile captures (`csrc/int8_vnni.cpp`): on CPUs
with AVX512-VNNI, `torch.ops.hf_attention.int8_vnni_matmul`; on the others with AVX2, `int8_avx2_matmul`.

A decoding step multiplies a few rows (one per sentence and beam) by every weight matrix. torch's
`_weight_int8pack_mm` converts every weight to float before multiplying, and fbgemm's dynamic product quantises a
whole batch with one scale; these kernels quantise each input row to integer steps (symmetric, one scale per row) and
multiply integers, by weights packed once (`pack_weight`) so that a tile of rows x 16-column blocks accumulates in
registers without sums across lanes:
- VNNI: float32 or bf16 rows in 8 bits, 4-way int8 dot products. Transformer-base's products on a 2-core Xeon with
  AVX512-VNNI: 1 row by 512x1536 in 12 µs (fbgemm's dynamic product: 67 µs), 32 rows in 113-167 µs (fbgemm:
  151-166 µs), about 3x the row-by-row kernel this replaced.
- AVX2: float32 rows in 7 bits (vpmaddubsw's 16-bit pair sums), as fbgemm on AVX2, so that nothing goes through bf16,
  which AVX2 CPUs emulate; 1.3-1.9x the row-by-row kernel this replaced.

The same library holds `torch.ops.hf_attention.cached_attention` (`csrc/cached_attention.cpp`): a decoding step's
self-attention over a cache that beam search does not reorder (generation_hf_attention.AncestralCacheLayer), which
`optimize_for_inference` installs on CPUs with AVX2 (`cached_attention_available()`).

The C++ sources are compiled on first use with `torch.utils.cpp_extension` (a C++ compiler and ninja, as torch.compile
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
# Built into the same library: the decoding step's self-attention over a cache beam search never reorders
# (`cached_attention.py`).
SOURCES = (SOURCE, Path(__file__).parent / "csrc" / "cached_attention.cpp")
# How long a process waits for another's build of the operations before it gives up and uses torch's kernels.
BUILD_WAIT_SECONDS = 600
# "built": whether the operations are registered in this process; "vnni", "avx2", "attention": the last answers of
# *_available()
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


def cached_attention_available() -> bool:
    """Whether `torch.ops.hf_attention.cached_attention` (csrc/cached_attention.cpp, built with these operations)
    runs here: AVX2 in the capability map and in this CPU, and the operations built and loaded."""
    return _available("attention", lambda machine: machine.avx2)


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
                sources=[str(source) for source in SOURCES],
                extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],  # products then bias, as the reference
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


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 weights in the layout the operations read, (⌈N/16⌉, ⌈K/4⌉, 64), zero-padded: for each block of 16
    outputs and each 4 consecutive inputs, 64 bytes holding output 0's 4 weights, then output 1's, ... output 15's."""
    outputs, inputs = weight.shape
    padded = torch.nn.functional.pad(weight, (0, -inputs % 4, 0, -outputs % 16))
    blocks, groups = padded.shape[0] // 16, padded.shape[1] // 4
    return padded.view(blocks, 16, groups, 4).permute(0, 2, 1, 3).reshape(blocks, groups, 64).contiguous()


def _output_like(
    rows: torch.Tensor, packed_weight: torch.Tensor, weight_scale, weight_sums=None, bias=None, relu=False
) -> torch.Tensor:
    """The operation's output without computing it, for torch.compile's tracing."""
    return rows.new_empty(rows.shape[0], weight_scale.shape[0], dtype=torch.float32)
