"""Export to ONNX with torch.onnx (the dynamo exporter): `export_onnx(model_dir, output_dir)` or
`scripts/export.py onnx SRC DST`, and `OnnxModelForSeq2SeqLM`, which runs the graphs with onnxruntime under
transformers' `generate()`.

Three graphs, as optimum lays out seq2seq models, so that decoding reuses the keys and values of earlier steps:
- `encoder.onnx`: (input_ids, attention_mask) -> encoder_hidden_states;
- `decoder.onnx`, the first step: (decoder_input_ids, encoder_hidden_states, encoder_attention_mask) -> logits and
  every layer's self-attention keys/values and cross-attention keys/values;
- `decoder_with_past.onnx`, the later steps: the same inputs plus those keys/values -> logits and the self-attention
  keys/values grown by one position.
Batch size and both lengths are dynamic. The tokenizer and configs are saved beside the graphs.

Needs the optional extra: `pip install 'hf_attention[onnx]'` (onnx, onnxscript, onnxruntime).
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DynamicCache,
    EncoderDecoderCache,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from ..checkpoint_io_hf_attention import is_inside, replacing_folder
from ..configuration_hf_attention import HfAttentionConfig
from ..generation_hf_attention import with_constrained_search, with_length_penalty_style, with_source_length_limit
from ..modeling_hf_attention import HfAttentionForConditionalGeneration
from .errors import ExportError

GRAPHS = ("encoder.onnx", "decoder.onnx", "decoder_with_past.onnx")


def import_onnx_runtime():
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError(
            "the onnx engine needs onnx, onnxscript and onnxruntime: pip install 'hf_attention[onnx]'."
        ) from None
    return onnxruntime


class EncoderGraph(nn.Module):
    def __init__(self, model: HfAttentionForConditionalGeneration):
        super().__init__()
        self.encoder = model.get_encoder()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class DecoderGraph(nn.Module):
    """One decoding step; with `with_past`, given the keys and values of the earlier steps (4 tensors per layer:
    self-attention key, value, cross-attention key, value)."""

    def __init__(self, model: HfAttentionForConditionalGeneration, with_past: bool):
        super().__init__()
        self.model, self.with_past = model, with_past

    def forward(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask, *past):
        config = self.model.config
        cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
        for layer in range(config.decoder_layers if self.with_past else 0):
            self_key, self_value, cross_key, cross_value = past[4 * layer : 4 * layer + 4]
            cache.self_attention_cache.update(self_key, self_value, layer)
            cache.cross_attention_cache.update(cross_key, cross_value, layer)
            cache.is_updated[layer] = True
        output = self.model(
            encoder_outputs=(encoder_hidden_states,),
            attention_mask=encoder_attention_mask,
            decoder_input_ids=decoder_input_ids,
            cache=cache,
            use_cache=True,
        )
        present = []
        for layer in range(config.decoder_layers):
            present += [cache.self_attention_cache.layers[layer].keys, cache.self_attention_cache.layers[layer].values]
            if not self.with_past:  # the cross-attention keys and values are computed once, at the first step
                present += [
                    cache.cross_attention_cache.layers[layer].keys,
                    cache.cross_attention_cache.layers[layer].values,
                ]
        return (output.logits, *present)


def past_names(layers: int, prefix: str, with_cross: bool) -> list[str]:
    names = []
    for layer in range(layers):
        names += [f"{prefix}.{layer}.decoder.key", f"{prefix}.{layer}.decoder.value"]
        if with_cross:
            names += [f"{prefix}.{layer}.encoder.key", f"{prefix}.{layer}.encoder.value"]
    return names


def export_onnx(model_dir: str | Path, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `model_dir`'s model as the three ONNX graphs (and its tokenizer and configs); returns `output_dir`.

    Raises:
        ExportError: the onnx packages are missing, `output_dir` exists without `overwrite`, or the folder holds no
            hf_attention model. Nothing is written then.
    """
    output_dir = Path(output_dir)
    if is_inside(model_dir, output_dir):
        raise ExportError(f"DESTINATION {output_dir} holds SOURCE {model_dir}: the export would replace its own "
                          "input; choose another folder.")  # fmt: skip
    if output_dir.exists() and not overwrite:
        raise ExportError(f"{output_dir} already exists; pass --overwrite to replace it.")
    import_onnx_runtime()
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    if not isinstance(model, HfAttentionForConditionalGeneration):
        raise ExportError(f"{model_dir} holds a {type(model).__name__}, not an hf_attention model.")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    batch, source, past = torch.export.Dim("batch"), torch.export.Dim("source"), torch.export.Dim("past")
    input_ids = torch.full((2, 5), config.eos_token_id)
    mask = torch.ones_like(input_ids)
    mask[1, 3:] = 0
    with torch.no_grad():
        hidden = EncoderGraph(model).eval()(input_ids, mask)
        start = torch.full((2, 1), config.decoder_start_token_id)
        first = DecoderGraph(model, with_past=False).eval()(start, hidden, mask)
    with replacing_folder(output_dir, carry_over=False) as staging:
        torch.onnx.export(
            EncoderGraph(model).eval(), (input_ids, mask), staging / "encoder.onnx", dynamo=True,
            input_names=["input_ids", "attention_mask"], output_names=["encoder_hidden_states"],
            dynamic_shapes={"input_ids": {0: batch, 1: source}, "attention_mask": {0: batch, 1: source}},
        )  # fmt: skip
        step_inputs = ["decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask"]
        step_shapes = ({0: batch}, {0: batch, 1: source}, {0: batch, 1: source})
        torch.onnx.export(
            DecoderGraph(model, with_past=False).eval(),
            (torch.full((2, 1), config.decoder_start_token_id), hidden, mask),
            staging / "decoder.onnx", dynamo=True, input_names=step_inputs,
            output_names=["logits", *past_names(config.decoder_layers, "present", with_cross=True)],
            dynamic_shapes=step_shapes,
        )  # fmt: skip
        past_shapes = [{0: batch, 2: past}, {0: batch, 2: past}, {0: batch, 2: source}, {0: batch, 2: source}]
        torch.onnx.export(
            DecoderGraph(model, with_past=True).eval(),
            (torch.full((2, 1), config.eos_token_id), hidden, mask, *first[1:]),
            staging / "decoder_with_past.onnx", dynamo=True,
            input_names=[*step_inputs, *past_names(config.decoder_layers, "past_key_values", with_cross=True)],
            output_names=["logits", *past_names(config.decoder_layers, "present", with_cross=False)],
            dynamic_shapes=(*step_shapes, tuple(past_shapes * config.decoder_layers)),  # *past: one tuple
        )  # fmt: skip
        config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return output_dir


class OnnxEncoder(nn.Module):
    """`encoder.onnx` behind the encoder interface `generate()` calls."""

    main_input_name = "input_ids"

    def __init__(self, session):
        super().__init__()
        self.session = session

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = {"input_ids": to_numpy(input_ids, np.int64), "attention_mask": to_numpy(attention_mask, np.int64)}
        (hidden,) = self.session.run(None, inputs)
        return BaseModelOutput(last_hidden_state=torch.from_numpy(hidden))


def to_numpy(tensor: torch.Tensor, dtype) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(dtype, copy=False)


class OnnxModelForSeq2SeqLM(PreTrainedModel, GenerationMixin):
    """The graphs of `export_onnx`, run by onnxruntime, as a transformers model (as optimum's
    `ORTModelForSeq2SeqLM`): transformers' own `generate()` decodes with them, so greedy search, beam search,
    sampling and every generation option give the tokens of the PyTorch model.

    The keys and values of earlier steps live in transformers' `EncoderDecoderCache` (beam search reorders its
    self-attention part); each step hands them to `decoder_with_past.onnx`. The graphs decode one token per step,
    from the decoder start token.

    Example: `OnnxModelForSeq2SeqLM.from_pretrained("runs/en-de-onnx").generate(**batch, num_beams=4)`.
    """

    config_class = HfAttentionConfig
    main_input_name = "input_ids"

    def __init__(self, config: HfAttentionConfig, sessions: dict, generation_config: GenerationConfig | None = None):
        super().__init__(config)
        self.encoder = OnnxEncoder(sessions["encoder.onnx"])
        self.first_step, self.next_step = sessions["decoder.onnx"], sessions["decoder_with_past.onnx"]
        self.past_input_names = past_names(config.decoder_layers, "past_key_values", with_cross=True)
        if generation_config is not None:
            self.generation_config = generation_config

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, providers: list[str] | None = None, session_options=None
    ) -> "OnnxModelForSeq2SeqLM":
        """The model in an `export_onnx` folder; `providers`: onnxruntime's execution providers (default: CPU);
        `session_options`: an `onnxruntime.SessionOptions` for the three graphs (default: `session_options()`)."""
        onnxruntime = import_onnx_runtime()
        folder = Path(folder)
        missing = [name for name in GRAPHS if not (folder / name).is_file()]
        if missing:
            raise ExportError(f"{folder} holds no {', '.join(missing)}: export it with scripts/export.py onnx.")
        providers = providers or ["CPUExecutionProvider"]
        options = session_options or cls.session_options()
        sessions = {
            name: onnxruntime.InferenceSession(str(folder / name), options, providers=providers) for name in GRAPHS
        }
        model = cls(AutoConfig.from_pretrained(folder), sessions, GenerationConfig.from_pretrained(folder))
        return model.eval()

    @staticmethod
    def session_options():
        """onnxruntime's defaults, but for threads that wait without spinning: between two graph runs
        transformers' `generate()` runs torch operations (beam search's top-k, the cache's reordering), and
        onnxruntime's threads, spinning after each run, took the cores those needed. Beam 4 over 300 Multi30k
        sentences in batches of 32: 4.0 s instead of 6.1 s on 2 cores (greedy, one sentence at a time: 7% faster)."""
        options = import_onnx_runtime().SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # inputs and outputs cross to onnxruntime as CPU arrays

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def get_encoder(self, modality: str | None = None) -> OnnxEncoder:
        return self.encoder

    def generate(
        self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs
    ):
        """transformers' `generate`, with §6.1's length limit and length penalty as the PyTorch model applies them,
        and lexical constraints (`constraints=[...]`: `constraints_hf_attention.py`)."""
        config = generation_config or self.generation_config
        kwargs = with_length_penalty_style(config, with_source_length_limit(config, inputs, kwargs))
        kwargs = with_constrained_search(kwargs)
        return super().generate(inputs, generation_config=generation_config, **kwargs)

    def _reorder_cache(self, cache: EncoderDecoderCache, beam_idx: torch.LongTensor) -> EncoderDecoderCache:
        """Beam search's reordering, of the self-attention cache only: beams move only among those of one source,
        whose cross-attention keys and values are equal (transformers repeats the encoder output per beam)."""
        cache.self_attention_cache.reorder_cache(beam_idx)
        return cache

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: EncoderDecoderCache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        """One decoding step of one token per sequence: its logits, and `cache` holding every step's keys and values.

        Raises:
            ValueError: more than one new target token per sequence, or `use_cache=False` (the graphs decode one
                token per step from the cache).
        """
        if decoder_input_ids is None or decoder_input_ids.shape[1] != 1 or use_cache is False:
            raise ValueError(
                "The ONNX graphs decode one token per step with the cache: decoder_input_ids must be (batch, 1) "
                "and use_cache must not be False."
            )
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden_states = encoder_outputs[0]
        if attention_mask is None:
            attention_mask = torch.ones(hidden_states.shape[:2], dtype=torch.long)
        step_inputs = {
            "decoder_input_ids": to_numpy(decoder_input_ids, np.int64),
            "encoder_hidden_states": to_numpy(hidden_states, np.float32),
            "encoder_attention_mask": to_numpy(attention_mask, np.int64),
        }
        if cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        layers = range(self.config.decoder_layers)
        if cache.get_seq_length() == 0:
            logits, *present = self.first_step.run(None, step_inputs)
            for layer in layers:
                own_key, own_value, cross_key, cross_value = map(torch.from_numpy, present[4 * layer : 4 * layer + 4])
                cache.self_attention_cache.update(own_key, own_value, layer)
                cache.cross_attention_cache.update(cross_key, cross_value, layer)
                cache.is_updated[layer] = True
        else:
            past = []
            for layer in layers:
                own, cross = cache.self_attention_cache.layers[layer], cache.cross_attention_cache.layers[layer]
                past += [to_numpy(states, np.float32) for states in (own.keys, own.values, cross.keys, cross.values)]
            logits, *present = self.next_step.run(
                None, {**step_inputs, **dict(zip(self.past_input_names, past, strict=True))}
            )
            for layer in layers:  # the graph returns the self-attention keys and values grown by this position
                own = cache.self_attention_cache.layers[layer]
                own.keys, own.values = map(torch.from_numpy, present[2 * layer : 2 * layer + 2])
        return Seq2SeqLMOutput(logits=torch.from_numpy(logits), cache=cache)
