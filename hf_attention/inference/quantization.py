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
from .int8_vnni import int8_avx2_available, int8_vnni_available

logger = logging.get_logger(__name__)

QUANTIZATIONS = (None, "int8", "bf16")
INT8_METHOD = "hf_attention_int8"


def cpu_has_vnni() -> bool:
    """Whether the CPU multiplies int8 with 32-bit accumulation (AVX-512 VNNI or AVX-VNNI). Without it, fbgemm adds
    int8 products in 16 bits, which full-range activations can saturate; torch then quantises them to 7 bits."""
    machine = hardware.capabilities()
    return machine.avx512_vnni or machine.avx_vnni


INT8_KERNELS = ("dynamic", "weight_only", "vnni", "avx2")
DEQUANTIZE_FROM_ROWS = 24


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights, one scale per output row, and one of two kernels:

    - `"dynamic"`: inputs quantised to int8 per call, int8 products (torch's dynamic quantized linear, fbgemm);
    - `"weight_only"`: bf16 inputs times the int8 weights (`torch._weight_int8pack_mm`), an aten operation that
      torch.compile can capture, unlike fbgemm's packed weights. From `DEQUANTIZE_FROM_ROWS` rows on (the encoder,
      large batches) the product is bound by arithmetic, not by the weights' bytes, and bf16 weights dequantized for
      the call multiply faster: 360 µs instead of 880 µs for 64 rows by a 512×2048 matrix (at 16 rows the int8
      kernel is 15% faster). Eager on a CPU, a packed bf16 copy is kept instead (`_bf16_product`). torch's int8
      kernel is wrong where 16 does not divide `in_features` (torch 2.13, CPU): such layers multiply in bf16.
    - `"vnni"`: below `DEQUANTIZE_FROM_ROWS` rows, each input row quantised to int8 (its own scale) times the int8
      weights with AVX512-VNNI dot products (`torch.ops.hf_attention.int8_vnni_matmul`, which torch.compile
      captures; see `int8_vnni.py`). From that many rows on, and where that operation is not available (no
      AVX512-VNNI, no compiler), it computes as `"weight_only"`.
    - `"avx2"`, for CPUs without AVX512-VNNI, whose bf16 is emulated: float32 inputs throughout. Inside a compiled
      step, and eagerly below `DEQUANTIZE_FROM_ROWS` rows, each input row quantised to int8 (its own scale) times the
      int8 weights with AVX2 (`torch.ops.hf_attention.int8_avx2_matmul`); eager calls with more rows (the encoder)
      go to fbgemm's dynamic int8 product, as `"dynamic"`. Without the operation: the float32 product of the
      dequantized weights when compiling, fbgemm's otherwise.

    The weights are kept as plain int8 and float tensors, so that safetensors stores them (the same for both kernels);
    the packed form that fbgemm reads is built on first use and after every load.

    `rows_for_own_kernel` (default `DEQUANTIZE_FROM_ROWS`) is the row count from which the "vnni" and "avx2" kernels
    hand eager calls to the faster batch kernels; `optimize_for_inference(batch_invariant=True)` raises it past any
    batch, so that every row is quantised with its own scale and a sentence's outputs never depend on its batch.
    """

    rows_for_own_kernel: int = DEQUANTIZE_FROM_ROWS  # a layer may raise its own

    def __init__(self, in_features: int, out_features: int, bias: bool = True, kernel: str = "dynamic", device=None):
        super().__init__()
        if kernel not in INT8_KERNELS:
            raise ValueError(f"kernel={kernel!r}: must be one of {', '.join(INT8_KERNELS)}.")
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        if kernel == "vnni":
            int8_vnni_available()  # builds the operation now: torch.compile's tracing only reads whether it built
        if kernel == "avx2":
            int8_avx2_available()
        if kernel in ("vnni", "avx2"):
            # each weight row's sum, which the operations take at every call: derived from the weights, not saved
            sums = torch.zeros(out_features, dtype=torch.int32, device=device)
            self.register_buffer("weight_sums", sums, persistent=False)
        if kernel in ("vnni", "weight_only"):
            # the scales as torch's int8 product takes them, kept as a buffer: inductor's lowering of
            # `_weight_int8pack_mm` fails on scales converted inside the compiled step. Derived, not saved.
            scale_bf16 = torch.ones(out_features, dtype=torch.bfloat16, device=device)
            self.register_buffer("weight_scale_bf16", scale_bf16, persistent=False)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self._packed = None
        self._prepacked_bf16, self._prepacked_from = None, None

    @classmethod
    def concatenated(cls, layers: list["Int8Linear"]) -> "Int8Linear":
        """One layer whose outputs are exactly the `layers`' outputs side by side, for layers that share their
        inputs: the weight rows and scales are theirs, and an input quantised once is what each of them would have
        quantised. A derived copy: its tensors are not saved (the layers' are), and `refresh_from` takes them again."""
        first = layers[0]
        out_features = sum(layer.out_features for layer in layers)
        fused = cls(first.in_features, out_features, first.bias is not None, first.kernel, first.weight.device)
        for name in ("weight", "weight_scale", "bias"):
            if getattr(fused, name) is not None:
                fused.register_buffer(name, getattr(first, name).new_empty(0), persistent=False)
        return fused.refresh_from(layers)

    def refresh_from(self, layers: list["Int8Linear"]) -> "Int8Linear":
        for name in ("weight", "weight_scale", "bias"):
            if getattr(self, name) is not None:
                setattr(self, name, torch.cat([getattr(layer, name).detach() for layer in layers]))
        self._packed, self._prepacked_from = None, None
        self._sum_weight_rows()
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "dynamic") -> "Int8Linear":
        """Symmetric per-row quantisation: row r is stored as round(w_r / s_r) with s_r = max|w_r| / 127."""
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        quantized = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel, weight.device)
        quantized.weight.copy_(torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        quantized.weight_scale.copy_(scale)
        quantized._sum_weight_rows()
        if linear.bias is not None:
            quantized.bias.copy_(linear.bias.detach().float())
        return quantized

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def _pack(self):
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # torch means to drop quantized tensors; its int8 kernels still take them
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
            weight = torch._make_per_channel_quantized_tensor(self.weight, self.weight_scale.double(), zero_points, 0)
        bias = None if self.bias is None else self.bias.float()
        return torch.ops.quantized.linear_prepack(weight, bias)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None
        self._sum_weight_rows()

    def _sum_weight_rows(self):
        """The tensors derived from the weights and scales (row sums, bf16 scales), taken again after they change."""
        with torch.no_grad():
            if self.kernel in ("vnni", "avx2"):
                self.weight_sums.copy_(self.weight.sum(dim=1, dtype=torch.int32))
            if self.kernel in ("vnni", "weight_only"):
                self.weight_scale_bf16.copy_(self.weight_scale)

    def after_loading(self):
        """transformers' loader hands over tensors that view the checkpoint file at any byte offset, and
        `torch._weight_int8pack_mm` crashes (segmentation fault) on int8 weights that are not 64-byte aligned: those
        are copied. The loader sets the weights directly: the "vnni" kernel's row sums are taken here."""
        for name in ("weight", "weight_scale", "bias"):
            tensor = getattr(self, name)
            if tensor is not None and tensor.data_ptr() % 64:
                setattr(self, name, tensor.clone())  # a buffer: the copy replaces it
        self._sum_weight_rows()

    def _bf16_product(self, rows: torch.Tensor) -> torch.Tensor:
        """rows @ the int8 weights as bf16 (exact: |w| <= 127). Outside torch.compile, on a CPU oneDNN packs, keeps
        and reuses that bf16 copy, as `PrepackedLinear` does: generate()'s encoding of one 64-token sentence takes
        8.6 ms instead of 12.5 ms, for 2 bytes per weight of the layers that see that many rows."""
        if torch.compiler.is_compiling() or rows.device.type != "cpu" or not can_prepack_bf16():
            return rows @ self.weight.to(torch.bfloat16).t()
        version = (self.weight.data_ptr(), self.weight._version)
        if self._prepacked_from != version:
            bf16_weight = self.weight.to(torch.bfloat16)
            self._prepacked_bf16 = torch.ops.mkldnn._reorder_linear_weight(bf16_weight)
            self._prepacked_from = version
        return torch.ops.mkldnn._linear_pointwise(rows, self._prepacked_bf16, None, "none", [], "")

    def _apply(self, fn, recurse: bool = True):
        """`model.to(dtype)` converts every floating-point buffer; the per-row scales and the bias stay float32, as
        documented and saved (in bf16 a scale's gain error reaches 0.4%), and the bf16 scales stay bf16."""
        names = ("weight_scale", "bias", "weight_scale_bf16")
        kept = {name: self._buffers[name] for name in names if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            if self._buffers[name].dtype != original.dtype:  # the device moves; the dtype does not
                self._buffers[name] = original.to(self._buffers[name].device)
        return self

    def __getstate__(self) -> dict:  # packed copies are opaque to pickle and deepcopy; they are rebuilt on use
        state = super().__getstate__()
        state["_packed"], state["_prepacked_bf16"], state["_prepacked_from"] = None, None, None
        state.pop("_derived_from", None)
        return state

    _derived_from: tuple = (None, None, -1, -1)  # (weight, scale, their versions) the derived tensors were taken from

    def _refresh_if_changed(self) -> None:
        """Take the derived tensors (row sums, bf16 scales, fbgemm's packed weights) again when the weights or scales
        were replaced or changed in place since they were taken (a `copy_` into `weight`, an edited scale): a stale
        row sum would offset every output of its row. Identity and version checks: a fraction of a microsecond."""
        weight, scale = self.weight, self.weight_scale
        taken_weight, taken_scale, weight_version, scale_version = self._derived_from
        if weight is taken_weight and scale is taken_scale and weight._version == weight_version:
            if scale._version == scale_version:
                return
        self._packed = None
        self._sum_weight_rows()
        self._derived_from = (weight, scale, weight._version, scale._version)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():  # a compiled step reads the buffers as they were when it compiled
            self._refresh_if_changed()
        if self.kernel == "avx2" and hidden_states.device.type == "cpu":
            rows = hidden_states.reshape(-1, self.in_features).float()
            compiling = torch.compiler.is_compiling()
            if compiling or rows.shape[0] < self.rows_for_own_kernel:
                if int8_avx2_available():
                    weight_scale = self.weight_scale.float()
                    output = torch.ops.hf_attention.int8_avx2_matmul(rows, self.weight, weight_scale, self.weight_sums)
                elif compiling:
                    output = rows @ self.dequantized_weight().t()
                else:
                    return self._dynamic_product(hidden_states)
                if self.bias is not None:
                    output = output + self.bias.float()
                return output.reshape(*hidden_states.shape[:-1], self.out_features).to(hidden_states.dtype)
            return self._dynamic_product(hidden_states)
        if self.kernel in ("weight_only", "vnni"):
            rows = hidden_states.reshape(-1, self.in_features).to(torch.bfloat16)
            few_rows = rows.shape[0] < DEQUANTIZE_FROM_ROWS
            own_kernel = rows.shape[0] < self.rows_for_own_kernel
            if own_kernel and self.kernel == "vnni" and rows.device.type == "cpu" and int8_vnni_available():
                weight_scale = self.weight_scale.float()
                output = torch.ops.hf_attention.int8_vnni_matmul(rows, self.weight, weight_scale, self.weight_sums)
                if self.bias is not None:
                    output = output + self.bias
                return output.reshape(*hidden_states.shape[:-1], self.out_features).to(hidden_states.dtype)
            scale = self.weight_scale_bf16
            if few_rows and self.in_features % 16 == 0:  # torch's int8 kernel is wrong otherwise (see above)
                output = torch._weight_int8pack_mm(rows, self.weight, scale)
            else:
                output = self._bf16_product(rows) * scale
            if self.bias is not None:
                output = output + self.bias.to(torch.bfloat16)
            return output.reshape(*hidden_states.shape[:-1], self.out_features).to(hidden_states.dtype)
        return self._dynamic_product(hidden_states)

    def _dynamic_product(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """fbgemm's (or qnnpack's) dynamic int8 product: the input quantised per call, weights packed once."""
        if self._packed is None:
            self._packed = self._pack()
        dtype = hidden_states.dtype
        # Activations in 8 bits where the CPU accumulates in 32 (VNNI), else in 7 as torch's own dynamic linear does:
        # on the Multi30k model 8 bits halve the log-probability error of 7.
        reduce_range = not cpu_has_vnni()
        output = torch.ops.quantized.linear_dynamic(hidden_states.float(), self._packed, reduce_range=reduce_range)
        return output.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"kernel={self.kernel}"
        )


def can_prepack_bf16() -> bool:
    """Whether oneDNN runs bf16 matrix products on this CPU (AVX512-BF16 or AMX)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


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
            product does, so that a sentence decodes to the same tokens in any batch (what a server batching
            strangers' requests needs); slower than fbgemm for many rows.

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
        # decoding steps on CPUs with AVX512-VNNI, times activations quantised to int8 by our own operation.
        kernel = "dynamic"
        if compile or batch_invariant:
            kernel = compiled_int8_kernel() if model.device.type == "cpu" else "weight_only"
        # The output projection gets its own int8 copy of the embedding matrix, which stays float for the lookups.
        model.config.tie_word_embeddings = False
        replace_linear_layers(model, functools.partial(Int8Linear.from_linear, kernel=kernel))
        if kernel in ("weight_only", "vnni"):
            model.to(torch.bfloat16)  # embeddings, norms and activations
        fuse_self_attention_projections(model)
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


def compiled_int8_kernel() -> str:
    """The int8 kernel of a compiled step on this CPU. "vnni" (bf16 activations) only where bf16 is native too:
    on an AVX512-VNNI Xeon without AVX512-BF16 it decoded 16 sentences at 0.89x MarianMTModel, eager int8 at 1.82x.
    "avx2" (float32 activations) where bf16 would be emulated; "weight_only" (bf16 activations) elsewhere."""
    native_bf16 = hardware.capabilities().native_cpu_bf16
    if native_bf16 and int8_vnni_available():
        return "vnni"
    if not native_bf16 and int8_avx2_available():
        return "avx2"
    return "weight_only"


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
