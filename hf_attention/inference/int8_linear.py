"""The int8 layer of `optimize_for_inference(quantization="int8")`: `nn.Linear` with int8 weights and one of the
int8 kernels (torch's dynamic product, bf16 activations times int8 weights, or our own row-wise operations of
`int8_vnni.py`), and which kernel a compiled step uses on this CPU."""

import warnings

import torch
from torch import nn

from .. import hardware
from .int8_vnni import int8_avx2_available, int8_vnni_available, pack_weight


def cpu_has_vnni() -> bool:
    """Whether the CPU multiplies int8 with 32-bit accumulation (AVX-512 VNNI or AVX-VNNI). Without it, fbgemm adds
    int8 products in 16 bits, which full-range activations can saturate; torch then quantises them to 7 bits."""
    machine = hardware.capabilities()
    return machine.avx512_vnni or machine.avx_vnni


INT8_KERNELS = ("dynamic", "weight_only", "vnni", "vnni_float32", "avx2")
# the kernels that multiply with our own operations (`int8_vnni.py`), and those of them with float32 activations
OWN_OPERATION_KERNELS = ("vnni", "vnni_float32", "avx2")
FLOAT32_KERNELS = ("vnni_float32", "avx2")
DEQUANTIZE_FROM_ROWS = 24


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights, one scale per output row, and one of these kernels:

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
    - `"vnni_float32"`, for CPUs with AVX512-VNNI whose bf16 is emulated (Xeons before Cooper Lake): float32
      inputs throughout. Inside a compiled step, and eagerly below `rows_for_own_kernel` rows, each input row
      quantised to int8 (its own scale) times the int8 weights with AVX512-VNNI (`int8_vnni_matmul`); eager calls
      with more rows (the encoder) go to fbgemm's dynamic int8 product, as `"dynamic"`. Where VNNI is missing (a
      model loaded on another CPU), the AVX2 operation takes its place.
    - `"avx2"`, for CPUs without AVX512-VNNI, whose bf16 is emulated: as `"vnni_float32"`, with rows quantised to 7
      bits and AVX2 products (`torch.ops.hf_attention.int8_avx2_matmul`). Without the operation: the float32 product
      of the dequantized weights when compiling, fbgemm's otherwise.

    The weights are kept as plain int8 and float tensors, so that safetensors stores them (the same for every
    kernel); the packed forms that fbgemm and our operations read are derived on first use and after every load
    (our operations' `weight_packed`: as many bytes again as the int8 weights).

    `rows_for_own_kernel` (default `DEQUANTIZE_FROM_ROWS`) is the row count from which the "vnni" and "avx2" kernels
    hand eager calls to the faster batch kernels; `optimize_for_inference(batch_invariant=True)` raises it past any
    batch, so that every row is quantised with its own scale and a sentence's outputs never depend on its batch.
    """

    rows_for_own_kernel: int = DEQUANTIZE_FROM_ROWS  # a layer may raise its own
    # ReLU applied to the output (`fuse_feed_forward_activation`: fc1 of a ReLU network), in the product's last pass
    # where our operations multiply
    fused_relu: bool = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, kernel: str = "dynamic", device=None):
        super().__init__()
        if kernel not in INT8_KERNELS:
            raise ValueError(f"kernel={kernel!r}: must be one of {', '.join(INT8_KERNELS)}.")
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        if kernel in OWN_OPERATION_KERNELS:
            # builds the operations now: torch.compile's tracing only reads whether they built
            if kernel != "avx2":
                int8_vnni_available()
            int8_avx2_available()
            # each weight row's sum and the weights in the operations' layout: derived from the weights, not saved
            sums = torch.zeros(out_features, dtype=torch.int32, device=device)
            self.register_buffer("weight_sums", sums, persistent=False)
            packed = pack_weight(torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("weight_packed", packed, persistent=False)
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
        """The tensors derived from the weights and scales (row sums, packed weights, bf16 scales), taken again after
        they change."""
        with torch.no_grad():
            if self.kernel in OWN_OPERATION_KERNELS:
                # in place: a compiled step holds these tensors
                self.weight_sums.copy_(self.weight.sum(dim=1, dtype=torch.int32))
                self.weight_packed.copy_(pack_weight(self.weight))
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
        if self.kernel in FLOAT32_KERNELS and hidden_states.device.type == "cpu":
            rows = hidden_states.reshape(-1, self.in_features).float()
            compiling = torch.compiler.is_compiling()
            if compiling or rows.shape[0] < self.rows_for_own_kernel:
                if self.kernel == "vnni_float32" and int8_vnni_available():
                    output = self._own_product(torch.ops.hf_attention.int8_vnni_matmul, rows)
                elif int8_avx2_available():
                    output = self._own_product(torch.ops.hf_attention.int8_avx2_matmul, rows)
                elif compiling:
                    output = rows @ self.dequantized_weight().t()
                    output = self._activated(output if self.bias is None else output + self.bias.float())
                else:
                    return self._dynamic_product(hidden_states)
                return output.reshape(*hidden_states.shape[:-1], self.out_features).to(hidden_states.dtype)
            return self._dynamic_product(hidden_states)
        if self.kernel in ("weight_only", "vnni"):
            rows = hidden_states.reshape(-1, self.in_features).to(torch.bfloat16)
            few_rows = rows.shape[0] < DEQUANTIZE_FROM_ROWS
            own_kernel = rows.shape[0] < self.rows_for_own_kernel
            if own_kernel and self.kernel == "vnni" and rows.device.type == "cpu" and int8_vnni_available():
                output = self._own_product(torch.ops.hf_attention.int8_vnni_matmul, rows)
                return output.reshape(*hidden_states.shape[:-1], self.out_features).to(hidden_states.dtype)
            scale = self.weight_scale_bf16
            if few_rows and self.in_features % 16 == 0:  # torch's int8 kernel is wrong otherwise (see above)
                output = torch._weight_int8pack_mm(rows, self.weight, scale)
            else:
                output = self._bf16_product(rows) * scale
            if self.bias is not None:
                output = output + self.bias.to(torch.bfloat16)
            output = self._activated(output)
            return output.reshape(*hidden_states.shape[:-1], self.out_features).to(hidden_states.dtype)
        return self._dynamic_product(hidden_states)

    def _activated(self, output: torch.Tensor) -> torch.Tensor:
        return torch.relu(output) if self.fused_relu else output

    def _own_product(self, operation, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, in_features) times the weights by one of our operations, the bias added and a fused ReLU applied
        in the same pass (float32): (M, out_features)."""
        bias = None if self.bias is None else self.bias.float()
        return operation(rows, self.weight_packed, self.weight_scale.float(), self.weight_sums, bias, self.fused_relu)

    def _dynamic_product(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """fbgemm's (or qnnpack's) dynamic int8 product: the input quantised per call, weights packed once."""
        if self._packed is None:
            self._packed = self._pack()
        dtype = hidden_states.dtype
        # Activations in 8 bits where the CPU accumulates in 32 (VNNI), else in 7 as torch's own dynamic linear does:
        # on the Multi30k model 8 bits halve the log-probability error of 7.
        reduce_range = not cpu_has_vnni()
        product = torch.ops.quantized.linear_relu_dynamic if self.fused_relu else torch.ops.quantized.linear_dynamic
        return product(hidden_states.float(), self._packed, reduce_range=reduce_range).to(dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"kernel={self.kernel}"
        )


def can_prepack_bf16() -> bool:
    """Whether oneDNN runs bf16 matrix products on this CPU (AVX512-BF16 or AMX)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def compiled_int8_kernel() -> str:
    """The int8 kernel of a compiled step on this CPU. "vnni" (bf16 activations) only where bf16 is native too:
    on an AVX512-VNNI Xeon without AVX512-BF16 it decoded 16 sentences at 0.89x MarianMTModel, eager int8 at 1.82x.
    Where bf16 would be emulated, float32 activations: "vnni_float32" with AVX512-VNNI, "avx2" without;
    "weight_only" (bf16 activations) elsewhere."""
    native_bf16 = hardware.capabilities().native_cpu_bf16
    if int8_vnni_available():
        return "vnni" if native_bf16 else "vnni_float32"
    if not native_bf16 and int8_avx2_available():
        return "avx2"
    return "weight_only"
