"""Faster generation: int8 or bf16 weights, and a static cache that torch.compile can capture.

`optimize_for_inference(model)` returns the model ready for transformers' own `generate()` and pipelines, with the
quantization and compile setting measured fastest for this machine's class (`hardware.inference_choice`: the CPU's
int8 and bf16 instructions, the GPU) and the workload. The mechanisms were chosen by measurement on a 2-core AVX-512
(VNNI, BF16) CPU, Transformer-base, one matrix product per call (`scripts/benchmark_generate.py` measures whole
decoding):

- `"int8"`: every `nn.Linear` gets int8 weights (one scale per output row) and quantises its input on the fly
  (torch's dynamic quantized linear, fbgemm). At one row (greedy decoding of one sentence) it is the fastest kernel:
  2.5–3× fp32 on 2048×512 and 8000×512 weights, where bf16 weights run no faster than fp32 and torchao's eager int8
  is slower than fp32; at 64 rows it is as fast as bf16, 3× fp32.
- `"bf16"`: bf16 weights and activations (AVX512-BF16/AMX on CPUs, tensor cores on GPUs): fastest for large batches.
  On a CPU every `nn.Linear` becomes a `PrepackedLinear`, whose weight oneDNN packs once instead of at every call
  (1.5–2× per product; beam 4 over 16 sentences went from 1.75 s to 1.58 s).
- `"int8"` with `compile=True`: fbgemm's packed weights cannot be compiled. On CPUs with AVX512-VNNI the decoding
  steps' rows are quantised to int8 and multiplied by our own operation (`int8_vnni.py`, the "vnni" kernel:
  greedy decoding of one sentence 6–9% faster, of 16 sentences 18% faster, than with `torch._weight_int8pack_mm`);
  elsewhere the int8 weights multiply bf16 activations (`_weight_int8pack_mm`, the "weight_only" kernel). Either
  runs in a compiled static-cache step: the fastest at batch 1.

An int8 model saves and reloads through transformers' quantization config (`quant_method: "hf_attention_int8"`):
`save_pretrained` stores the int8 weights and scales in safetensors (a quarter of the fp32 size) and
`from_pretrained` rebuilds the int8 layers; loading needs hf_attention installed. A bf16 model saves as any bf16 model.
"""

import functools
import sys
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import CompileConfig, PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import hardware
from .int8_linear import Int8Linear, can_prepack_bf16, compiled_int8_kernel
from .int8_vnni import cached_attention_available

logger = logging.get_logger(__name__)

QUANTIZATIONS = (None, "int8", "bf16")
INT8_METHOD = "hf_attention_int8"


class PrepackedLinear(nn.Linear):
    """`nn.Linear` for bf16 inference on a CPU: oneDNN multiplies by a copy of the weight packed once into its
    blocked (AMX / AVX512-BF16) layout. `F.linear` repacks the weight at every call, which on Transformer-base's
    matrices costs as much as the product: prepacked, a 512×2048 product takes 51 µs instead of 105 µs for one row
    and 138 µs instead of 200 µs for 64 rows.

    The module keeps the weight and bias `Parameter`s it was built from (ties, state dict and saving are those of
    `nn.Linear`); the packed copy is rebuilt when the weight changes, and training or other devices and dtypes use
    `nn.Linear`'s own path.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "PrepackedLinear":
        prepacked = cls.__new__(cls)
        nn.Module.__init__(prepacked)
        prepacked.in_features, prepacked.out_features = linear.in_features, linear.out_features
        prepacked.weight, prepacked.bias = linear.weight, linear.bias  # the same Parameters: ties are kept
        prepacked._packed, prepacked._packed_from = None, None
        return prepacked.train(linear.training)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            self.training
            or hidden_states.device.type != "cpu"
            or hidden_states.dtype != torch.bfloat16
            or weight.dtype != torch.bfloat16
            or (torch.is_grad_enabled() and weight.requires_grad)
        ):
            return super().forward(hidden_states)
        version = (weight.data_ptr(), weight._version)
        if self._packed_from != version:
            self._packed, self._packed_from = torch.ops.mkldnn._reorder_linear_weight(weight.detach()), version
        bias = None if self.bias is None else self.bias.detach()
        rows = hidden_states.reshape(-1, self.in_features)
        output = torch.ops.mkldnn._linear_pointwise(rows, self._packed, bias, "none", [], "")
        return output.reshape(*hidden_states.shape[:-1], self.out_features)

    def __getstate__(self) -> dict:  # the packed copy is opaque to pickle and deepcopy; it is rebuilt on use
        state = super().__getstate__()
        state["_packed"], state["_packed_from"] = None, None
        return state


def fuse_self_attention_projections(model: nn.Module) -> None:
    """Each self-attention's int8 q, k and v projections also as one product (`MultiHeadAttention.qkv_proj`): a
    decoding step makes 37 int8 products instead of 49, and one 1536×512 product takes 37 µs where three 512×512 take
    44 µs. The three layers stay (they are what is saved and loaded; the fused copy is taken again after
    `load_state_dict`), so self-attention's int8 weights are held twice: 9 MB for Transformer-base."""
    from ..modeling_hf_attention import MultiHeadAttention

    for name, module in model.named_modules():
        if isinstance(module, MultiHeadAttention) and name.rsplit(".", 1)[-1] == "self_attn":
            projections = [module.q_proj, module.k_proj, module.v_proj]
            if all(isinstance(layer, Int8Linear) for layer in projections) and module.qkv_proj is None:
                module.qkv_proj = Int8Linear.concatenated(projections)
                module.register_load_state_dict_post_hook(refresh_fused_projections)


def fuse_feed_forward_activation(model: nn.Module) -> None:
    """The ReLU of each int8 feed-forward network (§3.3's max(0, x W1 + b1)) applied by `fc1`'s product in its last
    pass: a pass of its own over 32 rows of 2048 outputs took 25 µs, a sixth of the product (Zen 4)."""
    for module in model.modules():
        fc1, activation = getattr(module, "fc1", None), getattr(module, "activation_fn", None)
        if isinstance(fc1, Int8Linear) and type(activation) is nn.ReLU:
            fc1.fused_relu = True
            module.activation_fn = nn.Identity()


def refresh_fused_projections(module: nn.Module, incompatible_keys) -> None:
    module.qkv_proj.refresh_from([module.q_proj, module.k_proj, module.v_proj])


def replace_linear_layers(model: nn.Module, build) -> None:
    """Every `nn.Linear` of `model` replaced, in place, by `build(linear)`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, build(child))


@register_quantization_config(INT8_METHOD)
@dataclass
class HfAttentionInt8Config(QuantizationConfigMixin):
    """The quantization config an int8 model (`optimize_for_inference(model, "int8")`) is saved with."""

    kernel: str = "dynamic"
    quant_method: str = INT8_METHOD

    def to_dict(self) -> dict:
        return {"quant_method": self.quant_method, "kernel": self.kernel}


@register_quantizer(INT8_METHOD)
class HfAttentionInt8Quantizer(HfQuantizer):
    """Loads a saved int8 model: the skeleton's `nn.Linear` layers become `Int8Linear` before its weights
    are read. Quantising an fp32 checkpoint while loading is not offered: load it, then call
    `optimize_for_inference(model, "int8")`."""

    requires_calibration = False

    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            raise ValueError(
                f"quantization_config={INT8_METHOD}: only loads models saved in int8; load the fp32 model and call "
                "hf_attention.optimize_for_inference(model, 'int8')."
            )

    def _process_model_before_weight_loading(self, model, **kwargs):
        kernel = self.quantization_config.kernel
        replace_linear_layers(
            model, lambda linear: Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, kernel)
        )
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for module in model.modules():
            if isinstance(module, Int8Linear):
                module.after_loading()
        fuse_self_attention_projections(model)  # the three layers were saved; the fused copy is taken again
        fuse_feed_forward_activation(model)
        return model

    def get_new_dtype(self, converter, param, dtype):
        return None  # int8 weights and their float32 scales load as saved

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:  # a property: transformers' training guard reads it as one
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def optimize_for_inference(
    model: PreTrainedModel,
    quantization: str | None = "auto",
    compile: bool | str = "auto",
    batch_size: int = 1,
    num_beams: int | None = None,
    batch_invariant: bool = False,
) -> PreTrainedModel:
    """The model, changed in place for fast generation; `generate()` and the pipelines work as before.

    Args:
        quantization: `"auto"` (the fastest measured for this machine and workload: `hardware.inference_choice`),
            `None` (as trained), `"int8"` (int8 weights, dynamic activation quantisation; CPU) or `"bf16"` (bf16
            weights and activations; on a CPU without bf16 instructions it is emulated, and a warning says so).
        compile: `"auto"` (with `quantization="auto"`, as `hardware.inference_choice` says; with a quantization
            named, no compiling, as before `"auto"` existed), or whether to decode with a static cache and a
            `torch.compile`d forward (each `generate()` asks for `cache_implementation="static"`, not the saved config;
            transformers compiles greedy search and sampling on the first `generate()`; beam search runs eagerly,
            with the growing cache of an unoptimized model). Pays off where the per-token overhead dominates (small
            batches); compiling takes tens of seconds. With `"int8"`, layers use kernels torch.compile can capture:
            "vnni" on CPUs with AVX512-VNNI (rows of fewer than 24 quantised to int8, our operation, built on first
            use), "avx2" on CPUs without it or native bf16 (float32 activations, our AVX2 operation), else
            "weight_only" (bf16 activations). On a CPU the compiled step does not check the model's
            modules for changes (`compile_without_module_guards`): change the model after its first `generate()`
            only with `disable_compile=True`.
        batch_size: the workload `"auto"` chooses for: sentences per `generate()` call.
        num_beams: the workload's beams (default: the generation config's).
        batch_invariant: with int8, quantise every input row with its own scale (the row-wise kernel of
            `compiled_int8_kernel()`, at every row count), never a whole batch with one scale as fbgemm's dynamic
            product does, and with float32 activations, so that a sentence decodes to the same tokens in any batch
            (what a server batching strangers' requests needs); slower than fbgemm for many rows.

    Raises:
        ValueError: an unknown `quantization`, or `"int8"` for a model that is not on the CPU.
    """
    if quantization not in (*QUANTIZATIONS, "auto"):
        raise ValueError(f"quantization={quantization!r}: must be one of 'auto', None, 'int8', 'bf16'.")
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile={compile!r}: must be 'auto', True or False.")
    quantization, compile = resolve_auto(model, quantization, compile, batch_size, num_beams)
    model.eval()
    if quantization == "bf16":
        model.to(torch.bfloat16)
        # torch.compile packs weights its own way; eager decoding on a CPU multiplies by prepacked ones.
        if model.device.type == "cpu" and not compile and can_prepack_bf16():
            replace_linear_layers(model, PrepackedLinear.from_linear)
    elif quantization == "int8":
        if model.device.type != "cpu":
            raise ValueError(
                f"quantization='int8': torch's dynamic int8 kernels run on the CPU, and the model is on "
                f"{model.device}; use quantization='bf16' there."
            )
        # fbgemm's packed weights cannot be compiled: with compile, int8 weights times bf16 activations, or, for
        # decoding steps, times activations quantised by our own operation. Eagerly, fbgemm's product, except on
        # AVX512-VNNI CPUs without bf16, where our VNNI operation multiplies the few rows of decoding steps (eager
        # Transformer-base, Xeon: beam 4 of 1 sentence 1.18x, greedy of 16 1.14x fbgemm alone) and fbgemm the many of
        # the encoder. Our AVX2 operation is slower than fbgemm's AVX2 kernels from 4 rows (0.86x at 16) eagerly.
        own_kernel = compiled_int8_kernel() if model.device.type == "cpu" else "weight_only"
        kernel = own_kernel if compile or batch_invariant or own_kernel == "vnni_float32" else "dynamic"
        if batch_invariant and kernel == "vnni":
            # float32 activations: in bf16, a sentence padded in a batch scored up to 0.04 away from itself alone
            # (the encoder's attention sums its padding's zeros in other blocks), enough to change a server's answer.
            kernel = "vnni_float32"
        # The output projection gets its own int8 copy of the embedding matrix, which stays float for the lookups.
        model.config.tie_word_embeddings = False
        replace_linear_layers(model, functools.partial(Int8Linear.from_linear, kernel=kernel))
        if kernel in ("weight_only", "vnni"):
            model.to(torch.bfloat16)  # embeddings, norms and activations
        fuse_self_attention_projections(model)
        fuse_feed_forward_activation(model)
        if batch_invariant:
            for layer in model.modules():
                if isinstance(layer, Int8Linear):
                    layer.rows_for_own_kernel = sys.maxsize
        model.config.quantization_config = HfAttentionInt8Config(kernel=kernel)
        model.hf_quantizer = HfAttentionInt8Quantizer(model.config.quantization_config, pre_quantized=True)
        model.is_quantized, model.quantization_method = True, INT8_METHOD
    if compile:
        compile_config = CompileConfig(fullgraph=True)
        compile_config._compile_all_devices = True  # transformers compiles only on GPUs unless told
        compiled_call = None
        if model.device.type == "cpu":
            # inductor's C++ wrapper calls the step's kernels from C++ rather than from generated Python: greedy
            # decoding of one sentence (int8) 0.1325 -> 0.1290 s. CUDA graphs, which it turns off, are for GPUs.
            compile_config.mode, compile_config.options = "default", {"cpp_wrapper": True}
            compiled_call = compile_without_module_guards(model.__call__, compile_config)  # skips module guards
        model.install_compiled_steps(compile_config, compiled_call)
    if model.device.type == "cpu" and cached_attention_available():
        # Eager decoding steps (beam search; greedy search where not compiled) attend with our operation over a
        # self-attention cache that beam search does not move (generation_hf_attention.AncestralCacheLayer).
        model.decode_with_cached_attention = True
        if quantization == "int8":
            # Stored in bf16 (rounding by 2^-9 at most, where int8 activations are rounded by up to 2^-8 of their
            # row's largest): 32 sentences' steps read half the bytes (generation_hf_attention.AncestralCacheLayer).
            model.cached_attention_state_dtype = torch.bfloat16
    return model


EMULATED_BF16_COST = (
    "about 3x slower than fp32 (beam 4 of 16 sentences on an AVX2 Zen 3: 0.33x MarianMTModel fp32 in bf16, "
    "1.26x in fp32)"
)


def resolve_auto(
    model: PreTrainedModel, quantization: str | None, compile: bool | str, batch_size: int, num_beams: int | None
) -> tuple[str | None, bool]:
    """`"auto"` replaced by `hardware.inference_choice` for the model's device and the workload, logged in one line;
    an explicit bf16 on a CPU that would emulate it warns once with the measured cost."""
    device = model.device.type
    num_beams = num_beams or model.generation_config.num_beams or 1
    choice = hardware.inference_choice(device, batch_size, num_beams)
    if compile == "auto":  # with a quantization asked for by name, compiling is asked for by name too
        compile = choice.compile and quantization == "auto"
    if quantization == "auto":
        quantization = choice.quantization
    if quantization == "bf16" and device == "cpu" and not hardware.capabilities().native_cpu_bf16:
        warnings.warn(
            f"quantization='bf16': this CPU has no bf16 instructions (AVX512-BF16, AMX or Arm BF16), so bf16 is "
            f"emulated, {EMULATED_BF16_COST}; quantization='auto' chooses {choice.describe()}.",
            stacklevel=3,
        )
    engine = (quantization or "fp32") + (" + compile" if compile else "")
    logger.info(f"{hardware.describe()}: decoding with {engine} ({batch_size} x {num_beams} beams)")
    return quantization, compile


def model_is_compiled(model: PreTrainedModel) -> bool:
    """Whether `optimize_for_inference` set the model to decode with compiled static-cache steps."""
    return bool(getattr(model, "static_cache_for_compiled_steps", False))


def compile_without_module_guards(function, compile_config: CompileConfig):
    """`torch.compile(function)` as `compile_config` says, without dynamo's guards on nn.Modules' attributes.

    Before every token dynamo checks ~1,300 guards, most on the model's modules (their flags, configs, parameters'
    shapes): without those, a compiled int8 step of one sentence takes 0.2 ms less (of 2.6 ms). The guards on the
    inputs stay, so a batch of another shape compiles its own step; a change to the model's modules after the first
    call goes unseen (`torch.compiler.reset()` forgets the compiled steps).
    """
    kwargs = compile_config.to_dict()
    mode = kwargs.pop("mode")  # torch.compile takes a mode or options: the mode's options, then the config's
    options = torch._inductor.list_mode_options(mode) if mode is not None else {}
    kwargs["options"] = {**options, **(kwargs["options"] or {})}
    kwargs["options"]["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    return torch.compile(function, **kwargs)
