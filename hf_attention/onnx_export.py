"""Export to ONNX with torch.onnx (the dynamo exporter): `export_onnx(model_dir, output_dir)` or
`scripts/export.py onnx SRC DST`, and `OnnxGreedyTranslator`, which decodes with onnxruntime.

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
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, DynamicCache, EncoderDecoderCache

from .checkpoint_io_hf_attention import replacing_folder
from .ctranslate2_export import ExportError
from .modeling_hf_attention import HfAttentionForConditionalGeneration

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
    import_onnx_runtime()
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise ExportError(f"{output_dir} already exists; pass --overwrite to replace it.")
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


class OnnxGreedyTranslator:
    """Greedy decoding with onnxruntime over an `export_onnx` folder: the tokens `generate(num_beams=1)` gives."""

    def __init__(self, folder: str | Path, providers: list[str] | None = None):
        onnxruntime = import_onnx_runtime()
        folder = Path(folder)
        providers = providers or ["CPUExecutionProvider"]
        self.encoder, self.first_step, self.next_step = (
            onnxruntime.InferenceSession(str(folder / name), providers=providers) for name in GRAPHS
        )
        from transformers import AutoConfig, GenerationConfig

        self.config = AutoConfig.from_pretrained(folder)
        self.generation_config = GenerationConfig.from_pretrained(folder)
        self.past_input_names = past_names(self.config.decoder_layers, "past_key_values", with_cross=True)

    def first_step_outputs(self, input_ids: np.ndarray, attention_mask: np.ndarray, decoder_input_ids: np.ndarray):
        """Encode, then the first decoding step: (the inputs every step takes, logits, own and cross keys/values)."""
        input_ids, attention_mask = input_ids.astype(np.int64), attention_mask.astype(np.int64)
        (hidden,) = self.encoder.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})
        step_inputs = {"encoder_hidden_states": hidden, "encoder_attention_mask": attention_mask}
        logits, *present = self.first_step.run(None, {**step_inputs, "decoder_input_ids": decoder_input_ids})
        layers = range(self.config.decoder_layers)
        own = [tensor for layer in layers for tensor in present[4 * layer : 4 * layer + 2]]
        cross = [tensor for layer in layers for tensor in present[4 * layer + 2 : 4 * layer + 4]]
        return step_inputs, logits, own, cross

    def next_step_outputs(self, step_inputs: dict, decoder_input_ids: np.ndarray, own: list, cross: list):
        """One cached step: (logits, the own keys/values grown by one position)."""
        values = [tensor for layer in range(self.config.decoder_layers)
                  for tensor in (*own[2 * layer : 2 * layer + 2], *cross[2 * layer : 2 * layer + 2])]  # fmt: skip
        past = dict(zip(self.past_input_names, values, strict=True))
        logits, *own = self.next_step.run(None, {**step_inputs, "decoder_input_ids": decoder_input_ids, **past})
        return logits, own

    def forced_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, decoder_input_ids: np.ndarray):
        """The logits (batch, steps, vocabulary) of decoding `decoder_input_ids` one token at a time."""
        tokens = decoder_input_ids.astype(np.int64)
        step_inputs, logits, own, cross = self.first_step_outputs(input_ids, attention_mask, tokens[:, :1])
        outputs = [logits]
        for position in range(1, tokens.shape[1]):
            logits, own = self.next_step_outputs(step_inputs, tokens[:, position : position + 1], own, cross)
            outputs.append(logits)
        return np.concatenate(outputs, axis=1)

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """(batch, 1 + new) token ids starting with the decoder start token, padded after `</s>`."""
        config = self.config
        tokens = np.full((input_ids.shape[0], 1), config.decoder_start_token_id, dtype=np.int64)
        step_inputs, logits, own, cross = self.first_step_outputs(input_ids, attention_mask, tokens)
        finished = np.zeros(input_ids.shape[0], dtype=bool)
        for step in range(max_new_tokens):
            next_tokens = np.where(finished, config.pad_token_id, logits[:, -1].argmax(-1))
            tokens = np.concatenate([tokens, next_tokens[:, None]], axis=1)
            finished |= next_tokens == config.eos_token_id
            if finished.all() or step == max_new_tokens - 1:
                break
            logits, own = self.next_step_outputs(step_inputs, next_tokens[:, None], own, cross)
        return tokens
