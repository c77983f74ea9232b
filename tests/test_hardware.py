"""The capability map: what it reads, how masks limit it, and the choices pinned for each machine class."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration, hardware, optimize_for_inference
from hf_attention.hardware import Capabilities, CudaDevice, inference_choice, training_attention, training_precision
from hf_attention.inference import int8_vnni
from hf_attention.inference.int8_vnni import int8_avx2_available
from hf_attention.inference.quantization import Int8Linear, PrepackedLinear, model_is_compiled

from .helpers import with_capabilities

ZEN3_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse4_2 avx avx2 fma bmi2
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse4_2 avx avx2 fma bmi2
"""
GRAVITON3_CPUINFO = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes crc32 asimddp sve i8mm bf16
CPU implementer\t: 0x41
"""


def test_cpuinfo_gives_the_first_processors_model_and_flags_on_x86_and_arm():
    assert hardware.parse_cpuinfo(ZEN3_CPUINFO) == ("AMD EPYC 7B13", frozenset("fpu sse4_2 avx avx2 fma bmi2".split()))
    model, flags = hardware.parse_cpuinfo(GRAVITON3_CPUINFO)
    graviton = Capabilities("aarch64", model or "aarch64", flags)
    assert graviton.cpu_class == "arm-bf16" and graviton.native_cpu_bf16 and graviton.int8_dot_products
    zen3 = Capabilities("x86_64", *hardware.parse_cpuinfo(ZEN3_CPUINFO))
    assert zen3.cpu_class == "avx2" and not zen3.native_cpu_bf16 and not zen3.int8_dot_products


@pytest.mark.parametrize("cpu_class", hardware.CPU_CLASSES)
def test_each_faked_class_is_the_class_its_map_reports(cpu_class):
    machine = Capabilities.for_cpu_class(cpu_class)
    assert machine.cpu_class == cpu_class
    assert cpu_class in machine.describe() and "\n" not in machine.describe()


def test_a_mask_to_avx2_removes_avx512_and_amx_but_keeps_avx_vnni():
    sapphire_rapids = Capabilities.for_cpu_class("amx")
    masked = hardware.mask(sapphire_rapids, "avx2")
    assert masked.cpu_class == "avx2" and not masked.avx512 and not masked.native_cpu_bf16
    assert "masked" in masked.describe()
    alder_lake_like = Capabilities("x86_64", "x", frozenset({"avx2", "fma", "avx_vnni", "avx512f", "avx512bw"}))
    assert hardware.mask(alder_lake_like, "avx2").cpu_class == "avx2-vnni"
    assert hardware.mask(sapphire_rapids, "default").cpu_class == "x86"
    assert hardware.mask(sapphire_rapids, "avx512") == sapphire_rapids
    assert hardware.mask(Capabilities.for_cpu_class("arm-bf16"), "avx2").cpu_class == "arm-bf16"  # x86 masks only
    with pytest.raises(ValueError, match="CPU capability 'avx3': must be default, avx2 or avx512"):
        hardware.mask(sapphire_rapids, "avx3")


@pytest.mark.parametrize("variable", hardware.CAPABILITY_VARIABLES)
def test_the_environments_mask_limits_the_map_a_process_reads(variable):
    code = "from hf_attention import hardware; m = hardware.capabilities(); print(m.cpu_class, m.avx512)"
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, variable: "avx2"},
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    masked = hardware.mask(hardware.detect(), "avx2")
    assert result.stdout.split() == [masked.cpu_class, str(masked.avx512)]


# The choices, pinned: (class, sentences, beams) -> (quantization, compile). Each rule's measurement is in hardware.py.
INFERENCE_CHOICES = [
    ("avx2", 1, 1, "int8", True),  # our AVX2 int8 kernel in a compiled step
    ("avx2", 8, 1, "int8", True),
    ("avx2", 16, 1, "int8", False),
    ("avx2", 1, 4, "int8", False),  # beam search is not compiled: fbgemm's dynamic int8
    ("avx2", 16, 4, "int8", False),
    ("avx2-vnni", 1, 4, "int8", False),
    ("avx512", 1, 1, "int8", True),  # AVX-512 without VNNI: the AVX2 kernel
    ("avx512", 16, 1, "int8", False),
    ("avx512-vnni", 1, 1, "int8", True),  # no native bf16: the VNNI kernel with float32 activations
    ("avx512-vnni", 16, 1, "int8", False),  # eager: the VNNI kernel below 24 rows, fbgemm above
    ("avx512-vnni", 16, 4, "int8", False),
    ("avx512-bf16", 1, 1, "int8", True),  # greedy of few sentences: the VNNI kernel in a compiled step
    ("avx512-bf16", 8, 1, "int8", True),
    ("avx512-bf16", 1, 4, "int8", False),  # beam search and 16 sentences: fbgemm and the cached attention, eager
    ("avx512-bf16", 16, 1, "int8", False),
    ("avx512-bf16", 16, 4, "int8", False),
    ("amx", 32, 4, "bf16", False),  # AMX's bf16 tiles from 64 rows per step
    ("amx", 1, 1, "int8", True),
    ("arm", 1, 1, "int8", False),
    ("arm-dotprod", 16, 4, "int8", False),
    ("arm-bf16", 1, 1, "int8", False),
    ("arm-bf16", 16, 4, "bf16", False),
    ("x86", 1, 1, "int8", False),
]


@pytest.mark.parametrize("cpu_class, sentences, beams, quantization, compile", INFERENCE_CHOICES)
def test_the_inference_choice_for_each_cpu_class_and_workload(cpu_class, sentences, beams, quantization, compile):
    choice = inference_choice("cpu", sentences, beams, Capabilities.for_cpu_class(cpu_class))
    assert (choice.quantization, choice.compile) == (quantization, compile)


def test_emulated_bf16_is_never_chosen_on_a_cpu():
    for cpu_class in hardware.CPU_CLASSES:
        machine = Capabilities.for_cpu_class(cpu_class)
        for sentences in (1, 4, 16, 64):
            for beams in (1, 4, 8):
                choice = inference_choice("cpu", sentences, beams, machine)
                assert choice.quantization != "bf16" or machine.native_cpu_bf16
        assert (training_precision("cpu", machine) == "bf16") == machine.native_cpu_bf16


def test_gpus_get_bf16_where_their_tensor_cores_compute_it():
    h100, v100, k80 = CudaDevice("H100", (9, 0)), CudaDevice("V100", (7, 0)), CudaDevice("K80", (3, 7))
    avx2 = "avx2"
    assert training_precision("cuda", Capabilities.for_cpu_class(avx2, (h100,))) == "bf16"
    assert training_precision("cuda", Capabilities.for_cpu_class(avx2, (v100,))) == "fp16"
    assert training_precision("cuda", Capabilities.for_cpu_class(avx2, (k80,))) == "fp32"
    greedy = inference_choice("cuda", 1, 1, Capabilities.for_cpu_class(avx2, (h100,)))
    beam = inference_choice("cuda", 1, 4, Capabilities.for_cpu_class(avx2, (h100,)))
    assert (greedy.quantization, greedy.compile, beam.quantization, beam.compile) == ("bf16", True, "bf16", False)
    assert inference_choice("cuda", 1, 1, Capabilities.for_cpu_class(avx2, (v100,))).quantization is None
    assert "H100 (sm_90)" in Capabilities.for_cpu_class(avx2, (h100,)).describe()


def tiny_model() -> HfAttentionForConditionalGeneration:
    torch.manual_seed(0)
    return HfAttentionForConditionalGeneration(HfAttentionConfig.from_preset("tiny"))


def test_auto_decodes_large_beams_with_eager_int8_our_vnni_operation_for_few_rows_on_cpus_without_bf16(monkeypatch):
    """Eager int8 is fbgemm's, except on AVX512-VNNI CPUs without bf16: our VNNI operation for a decoding step's few
    rows, fbgemm's for the encoder's many (where the operation built)."""
    with_capabilities(monkeypatch, "avx2")
    model = optimize_for_inference(tiny_model(), batch_size=16, num_beams=4)
    assert model.lm_head.kernel == "dynamic" and not model_is_compiled(model)
    with_capabilities(monkeypatch, "avx512-vnni")
    model = optimize_for_inference(tiny_model(), batch_size=16, num_beams=4)
    expected = "vnni_float32" if int8_vnni.int8_vnni_available() else "dynamic"
    assert model.lm_head.kernel == expected and not model_is_compiled(model)


def test_auto_on_an_amx_cpu_decodes_large_beams_in_bf16(monkeypatch):
    with_capabilities(monkeypatch, "amx")
    model = optimize_for_inference(tiny_model(), batch_size=16, num_beams=4)
    assert model.dtype == torch.bfloat16 and not any(isinstance(m, Int8Linear) for m in model.modules())
    assert not model_is_compiled(model)


def test_auto_on_an_avx512_bf16_cpu_decodes_large_beams_with_eager_int8(monkeypatch):
    with_capabilities(monkeypatch, "avx512-bf16")
    model = optimize_for_inference(tiny_model(), batch_size=16, num_beams=4)
    assert model.dtype == torch.float32 and model.lm_head.kernel == "dynamic"  # fbgemm's product, float32 activations
    assert not model_is_compiled(model)


def test_auto_on_an_avx512_bf16_cpu_compiles_int8_steps_with_the_vnni_kernel(monkeypatch):
    with_capabilities(monkeypatch, "avx512-bf16")
    model = optimize_for_inference(tiny_model())
    # the VNNI kernel where this CPU has the instructions too (a faked map never runs what the CPU lacks)
    expected = "vnni" if int8_vnni.int8_vnni_available() else "weight_only"
    assert model_is_compiled(model) and model.lm_head.kernel == expected


def test_auto_on_a_cpu_without_native_bf16_compiles_greedy_steps_with_a_float32_kernel(monkeypatch):
    for cpu_class in ("avx2", "avx512-vnni"):
        with_capabilities(monkeypatch, cpu_class)
        model = optimize_for_inference(tiny_model())
        assert model_is_compiled(model) and model.dtype == torch.float32
        # our VNNI operation where the map and this CPU have it, else the AVX2 one, else torch's
        expected = "weight_only"
        if int8_vnni.int8_vnni_available():
            expected = "vnni_float32"
        elif int8_avx2_available():
            expected = "avx2"
        assert model.lm_head.kernel == expected


def test_a_quantization_named_compiles_only_when_compiling_is_named_too(monkeypatch):
    with_capabilities(monkeypatch, "avx512-bf16")  # where "auto" compiles
    assert model_is_compiled(optimize_for_inference(tiny_model(), "auto"))
    assert not model_is_compiled(optimize_for_inference(tiny_model(), "int8"))
    assert not model_is_compiled(optimize_for_inference(tiny_model(), None))
    assert model_is_compiled(optimize_for_inference(tiny_model(), "int8", True))
    assert not model_is_compiled(optimize_for_inference(tiny_model(), "auto", False))


def test_explicit_bf16_on_a_cpu_that_emulates_it_warns_once_with_the_cost(monkeypatch):
    with_capabilities(monkeypatch, "avx2")
    with pytest.warns(UserWarning, match=r"bf16 is emulated, about 3x slower than fp32 .*'auto' chooses int8"):
        model = optimize_for_inference(tiny_model(), "bf16")
    assert model.dtype == torch.bfloat16
    with_capabilities(monkeypatch, "avx512-bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = optimize_for_inference(tiny_model(), "bf16")
    assert any(isinstance(m, PrepackedLinear) for m in model.modules()) or not hardware.detect().avx512


@pytest.mark.parametrize("value", ["int4", "fp16"])
def test_an_unknown_quantization_or_compile_is_refused(value):
    with pytest.raises(ValueError, match=f"quantization='{value}': must be one of 'auto', None, 'int8', 'bf16'"):
        optimize_for_inference(tiny_model(), value)
    with pytest.raises(ValueError, match="compile='yes': must be 'auto', True or False"):
        optimize_for_inference(tiny_model(), None, "yes")


def test_bf16_training_on_a_cpu_takes_eager_attention_and_everything_else_transformers_default():
    assert training_attention("cpu", "bf16") == "eager"  # SDPA's CPU backward pass is slow in bf16
    assert training_attention("cpu", "fp32") is None
    assert training_attention("cuda", "bf16") is None and training_attention("cuda:0", "fp16") is None
