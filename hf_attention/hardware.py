"""What this machine computes fast: one capability map, read once, that every precision and kernel choice consults.

Speed on a CPU depends on instructions that differ between machines of the same architecture: int8 dot products
(AVX512-VNNI, AVX-VNNI, Arm's dotprod), native bf16 arithmetic (AVX512-BF16, AMX, Arm's BF16) or none of them,
where PyTorch emulates bf16 more slowly than it computes in fp32. `capabilities()` reads them once (from
`/proc/cpuinfo`, or `sysctl` on macOS) with the CUDA devices, and `describe()` is the one line every job and
benchmark logs.

Masking: `ATEN_CPU_CAPABILITY=avx2` (PyTorch's own switch) or `HF_ATTENTION_CPU_CAPABILITY=avx2` make the map report
an AVX2-only CPU, so that a run on an AVX-512 machine chooses what an AVX2 machine would (`default` masks AVX2 as well;
`avx512` leaves the map as read). Tests build maps with `Capabilities.for_cpu_class` and install them with
`set_capabilities`.
"""

import functools
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

# The dtypes a user names (--dtype of the training job and of translate.py): the one table of them.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CPUINFO = Path("/proc/cpuinfo")
CAPABILITY_VARIABLES = ("ATEN_CPU_CAPABILITY", "HF_ATTENTION_CPU_CAPABILITY")
# The x86 flags above AVX2 that a mask to "avx2" removes (AVX-VNNI is an AVX2-class instruction and stays).
AVX512_PREFIXES = ("avx512", "amx")
AVX2_FLAGS = {"avx2", "fma", "avx_vnni"}

# Each class's flags, as /proc/cpuinfo names them: what `for_cpu_class` fakes and `cpu_class` reports.
CPU_CLASSES = {
    "amx": {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"},
    "avx512-bf16": {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"},
    "avx512-vnni": {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"},
    "avx512": {"avx2", "fma", "avx512f", "avx512bw"},
    "avx2-vnni": {"avx2", "fma", "avx_vnni"},
    "avx2": {"avx2", "fma"},
    "x86": {"sse4_2"},
    "arm-bf16": {"asimd", "asimddp", "bf16", "i8mm"},
    "arm-dotprod": {"asimd", "asimddp"},
    "arm": {"asimd"},
}
ARM_CLASSES = ("arm-bf16", "arm-dotprod", "arm")


@dataclass(frozen=True)
class CudaDevice:
    name: str
    compute_capability: tuple[int, int]

    @property
    def native_bf16(self) -> bool:
        return self.compute_capability >= (8, 0)  # Ampere and newer


@dataclass(frozen=True)
class Capabilities:
    """The CPU's instruction-set features (as `/proc/cpuinfo` names them) and the CUDA devices."""

    architecture: str  # "x86_64" or "aarch64"
    cpu_model: str
    cpu_flags: frozenset[str]
    cuda_devices: tuple[CudaDevice, ...] = ()
    masked_to: str | None = None  # the capability a mask limited the CPU to, if any

    @classmethod
    def for_cpu_class(cls, cpu_class: str, cuda_devices: tuple[CudaDevice, ...] = ()) -> "Capabilities":
        """A map of a typical CPU of `cpu_class` (one of `CPU_CLASSES`), for tests and what-if choices."""
        if cpu_class not in CPU_CLASSES:
            raise ValueError(f"cpu_class={cpu_class!r}: must be one of {', '.join(CPU_CLASSES)}.")
        architecture = "aarch64" if cpu_class in ARM_CLASSES else "x86_64"
        return cls(architecture, f"{cpu_class} CPU (faked)", frozenset(CPU_CLASSES[cpu_class]), cuda_devices)

    @property
    def is_x86(self) -> bool:
        return self.architecture in ("x86_64", "amd64", "i686")

    @property
    def is_arm(self) -> bool:
        return self.architecture in ("aarch64", "arm64")

    @property
    def avx2(self) -> bool:
        return self.is_x86 and "avx2" in self.cpu_flags

    @property
    def avx512(self) -> bool:
        return self.is_x86 and {"avx512f", "avx512bw"} <= self.cpu_flags

    @property
    def avx512_vnni(self) -> bool:
        return self.avx512 and "avx512_vnni" in self.cpu_flags

    @property
    def avx_vnni(self) -> bool:
        return self.avx2 and "avx_vnni" in self.cpu_flags

    @property
    def amx(self) -> bool:
        return self.avx512 and "amx_bf16" in self.cpu_flags

    @property
    def arm_dotprod(self) -> bool:
        return self.is_arm and "asimddp" in self.cpu_flags

    @property
    def int8_dot_products(self) -> bool:
        """int8 products accumulated in 32 bits (VNNI, dotprod); without them fbgemm adds pairs in 16 bits."""
        return self.avx512_vnni or self.avx_vnni or self.arm_dotprod

    @property
    def native_cpu_bf16(self) -> bool:
        """bf16 arithmetic in hardware (AVX512-BF16, AMX, Arm BF16); elsewhere PyTorch emulates it, slower than
        fp32."""
        if self.is_x86:
            return self.avx512 and bool({"avx512_bf16", "amx_bf16"} & self.cpu_flags)
        return self.is_arm and "bf16" in self.cpu_flags

    @property
    def cpu_class(self) -> str:
        """The first class of `CPU_CLASSES` whose flags this CPU has (the fastest it belongs to)."""
        candidates = ARM_CLASSES if self.is_arm else [name for name in CPU_CLASSES if name not in ARM_CLASSES]
        for name in candidates:
            if CPU_CLASSES[name] <= self.cpu_flags:
                return name
        return "arm" if self.is_arm else "x86" if self.is_x86 else self.architecture

    def describe(self) -> str:
        """One line: the CPU, its class and the flags that decide our choices, and the GPUs."""
        deciding = sorted(self.cpu_flags & set().union(*CPU_CLASSES.values()) - {"sse4_2"})
        masked = f"; features above {self.masked_to} masked" if self.masked_to else ""
        line = f"CPU: {self.cpu_model} ({self.cpu_class}{masked}: {' '.join(deciding) or 'no SIMD flags read'})"
        if self.cuda_devices:
            gpus = ", ".join(
                f"{gpu.name} (sm_{''.join(map(str, gpu.compute_capability))})" for gpu in self.cuda_devices
            )
            line += f"; CUDA: {gpus}"
        return line


def mask(capabilities: Capabilities, level: str) -> Capabilities:
    """The map as a CPU limited to `level` ("default", "avx2" or "avx512", ATEN_CPU_CAPABILITY's values) has it."""
    level = level.strip().lower()
    if not capabilities.is_x86 or level in ("", "avx512"):
        return capabilities
    if level not in ("default", "avx2"):
        raise ValueError(f"CPU capability {level!r}: must be default, avx2 or avx512.")
    kept = {flag for flag in capabilities.cpu_flags if not flag.startswith(AVX512_PREFIXES)}
    if level == "default":
        kept -= AVX2_FLAGS
    return Capabilities(
        capabilities.architecture, capabilities.cpu_model, frozenset(kept), capabilities.cuda_devices, level
    )


def read_cpu() -> tuple[str, str, frozenset[str]]:
    """The architecture, CPU model and feature flags of this machine (Linux's /proc/cpuinfo, macOS' sysctl)."""
    architecture = platform.machine().lower()
    try:
        model, flags = parse_cpuinfo(CPUINFO.read_text())
    except OSError:
        model, flags = platform.processor() or architecture, frozenset()
        if platform.system() == "Darwin" and architecture == "arm64":
            model, flags = _read_macos_arm()
    return architecture, model or architecture, frozenset(flags)


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """The first processor's model name and flags ("flags" on x86, "Features" on Arm) in /proc/cpuinfo's text."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def _read_macos_arm() -> tuple[str, frozenset[str]]:
    """Apple silicon: every model has NEON and dotprod; sysctl says whether it has BF16 (M2 and later)."""

    def sysctl(name: str) -> str:
        try:
            return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    flags = {"asimd", "asimddp"} | ({"bf16"} if sysctl("hw.optional.arm.FEAT_BF16") == "1" else set())
    return sysctl("machdep.cpu.brand_string") or "Apple silicon", frozenset(flags)


def read_cuda_devices() -> tuple[CudaDevice, ...]:
    if not torch.cuda.is_available():
        return ()
    return tuple(
        CudaDevice(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index))
        for index in range(torch.cuda.device_count())
    )


@functools.cache
def detect() -> Capabilities:
    """This machine's map, read once per process, with the environment's masks applied."""
    architecture, model, flags = read_cpu()
    detected = Capabilities(architecture, model, flags, read_cuda_devices())
    for variable in CAPABILITY_VARIABLES:
        if os.environ.get(variable):
            detected = mask(detected, os.environ[variable])
    return detected


_installed: list[Capabilities] = []


def capabilities() -> Capabilities:
    """The map every choice reads: the one `set_capabilities` installed, else this machine's."""
    return _installed[-1] if _installed else detect()


def set_capabilities(capabilities: Capabilities | None) -> None:
    """Make every choice read `capabilities` (None: this machine's again). For tests and what-if benchmarks."""
    _installed.clear()
    if capabilities is not None:
        _installed.append(capabilities)


def describe() -> str:
    return capabilities().describe()


# Choices made from the map. Each rule cites the measurement it rests on (scripts/benchmark_generate.py and
# scripts/benchmark_training.py, ratios against MarianMTModel fp32 in the same run; docs in the README).


@dataclass(frozen=True)
class InferenceChoice:
    """What `optimize_for_inference(model, "auto", "auto")` does for one workload, and why (one line)."""

    quantization: str | None  # None (as trained), "int8" or "bf16"
    compile: bool
    reason: str

    def describe(self) -> str:
        engine = (self.quantization or "fp32") + (" + compile" if self.compile else "")
        return f"{engine} ({self.reason})"


# From this many rows per decoding step (sentences × beams) bf16 products beat int8 ones on CPUs that compute bf16
# natively with AMX or without int8 dot products (on Zen 5, beam 4 of 16 sentences: 2.88x MarianMTModel with bf16,
# 2.55x with int8 + compile, before the cached attention; AVX512-VNNI CPUs now take eager int8 there, below).
BF16_FROM_ROWS = 64
# Greedy decoding of fewer sentences than this compiles its steps (measured: 1 sentence faster compiled, 16 faster
# eager: on AVX2 and, with the cached attention, on a Zen 4 with AVX512-BF16).
COMPILE_BELOW_SENTENCES = 16


def inference_choice(
    device: str = "cpu", batch_size: int = 1, num_beams: int = 1, machine: Capabilities | None = None
) -> InferenceChoice:
    """The fastest measured quantization and compile setting for decoding `batch_size` sentences with `num_beams`
    beams on `device`. Never a choice slower than fp32 there: emulated bf16 is never chosen."""
    machine = machine or capabilities()
    rows = max(1, batch_size) * max(1, num_beams)
    if str(device).startswith("cuda"):
        native = any(gpu.native_bf16 for gpu in machine.cuda_devices) or not machine.cuda_devices
        if not native:
            return InferenceChoice(None, False, "a GPU without bf16 tensor cores")
        # transformers compiles greedy search and sampling, not beam search (H100: greedy 2.80x compiled).
        return InferenceChoice(
            "bf16", num_beams == 1, "GPU: bf16 tensor cores" + (", compiled greedy steps" if num_beams == 1 else "")
        )
    greedy_few = num_beams == 1 and batch_size < COMPILE_BELOW_SENTENCES
    if machine.native_cpu_bf16 and rows >= BF16_FROM_ROWS and (machine.amx or not machine.avx512_vnni):
        return InferenceChoice("bf16", False, f"native bf16 and {rows} rows per step")
    if machine.avx512_vnni and machine.native_cpu_bf16:
        if greedy_few:
            # our VNNI kernel in a compiled static-cache step: greedy b1 5.19x MarianMTModel against eager int8's
            # 3.03x (Zen 4). Without native bf16 that step's bf16 activations are emulated (a Xeon with AVX512-VNNI
            # and no AVX512-BF16: greedy b16 0.89x, beam4 b16 0.84x): such CPUs take the AVX2 rules below.
            return InferenceChoice("int8", True, "AVX512-VNNI int8 kernel in a compiled step")
        # Beam search (not compiled) and larger batches: fbgemm's int8 products with our cached attention, eagerly.
        # Zen 4: beam4 b1 3.91x against 3.64x compiled, greedy b16 2.56x against 2.16x, beam4 b16 3.16x against
        # bf16's 2.78x (benchmark_generate.py, one run; CTranslate2 int8: 1.96x, 2.25x, 2.67x).
        return InferenceChoice("int8", False, "fbgemm's int8 products and the cached attention, eager")
    if machine.avx2 and greedy_few:
        # our int8 kernel with float32 activations in a compiled step: on a Xeon with AVX512-VNNI and no AVX512-BF16
        # (the VNNI kernel) greedy b1 4.41x MarianMTModel against eager int8's 1.89x; limited to AVX2 (the AVX2
        # kernel) 2.67x against 1.70x. transformers does not compile beam search.
        kernel = "AVX512-VNNI" if machine.avx512_vnni else "AVX2"
        return InferenceChoice("int8", True, f"{kernel} int8 kernel, float32 activations, in a compiled step")
    if machine.avx512_vnni:
        # eager int8 (beam search, large batches) without native bf16: our VNNI kernel for the few rows of a step,
        # fbgemm's for the encoder's many (optimize_for_inference's "vnni_float32"): beam4 b1 2.15x, beam4 b16 2.35x.
        return InferenceChoice("int8", False, "AVX512-VNNI int8 kernel below 24 rows per step, fbgemm's above")
    # AVX2 (beam search, large batches), Arm (qnnpack): fbgemm's / qnnpack's dynamic int8, eager. Limited to AVX2:
    # beam4 b1 2.17x against 1.72x compiled, greedy b16 1.86x against 1.74x, beam4 b16 1.99x against 1.92x.
    return InferenceChoice("int8", False, "dynamic int8 kernels")


def training_precision(device: str = "cpu", machine: Capabilities | None = None) -> str:
    """ "bf16", "fp16" or "fp32": mixed precision only where the hardware computes it natively."""
    machine = machine or capabilities()
    if str(device).startswith("cuda"):
        gpus = machine.cuda_devices
        if not gpus or all(gpu.native_bf16 for gpu in gpus):
            return "bf16"
        return "fp16" if all(gpu.compute_capability >= (7, 0) for gpu in gpus) else "fp32"
    return "bf16" if machine.native_cpu_bf16 else "fp32"


def training_attention(device: str = "cpu", precision: str = "fp32") -> str | None:
    """The attention kernel for training when none is named: None keeps transformers' default (SDPA).

    Under bf16 autocast on a CPU, SDPA's fused CPU kernel is slow in its backward pass: a training step of the
    Multi30k recipe's model (d_model 256, 3+3 layers, batch 64) took 649 ms with it against 509 ms with eager
    attention, Transformer-base (batch 32 × 64 tokens) 2542 against 2130 ms (Zen 4 with AVX512-BF16, 2 cores;
    medians of 20 steps). In fp32 the two are even (829 and 795 ms), and GPUs keep SDPA's flash kernels.
    """
    if str(device).startswith("cuda") or precision != "bf16":
        return None
    return "eager"
