"""Export to CTranslate2, the C++ inference engine of OpenNMT: `export_ctranslate2(model_dir, output_dir)` or
`scripts/export.py ctranslate2 SRC DST [--quantization int8]`.

CTranslate2's own converter reads hf_attention models as MarianMTModel and assumes opus-mt's conventions (the pad
token last, dropped from the vocabulary; decoding started from a zero embedding), which models trained here do not
follow. This exporter builds CTranslate2's `TransformerSpec` from the model itself, so every variant this project
trains or converts maps exactly: post- or pre-LN layers, ReLU or GELU, interleaved or split sinusoids (written out as
a position table) or learned positions, the pad token anywhere, decoding started from `<s>` or from pad, shared or
separate embeddings, a final logits bias. The tokenizer is saved beside the model, so the folder is all a user needs.

Needs the optional extra: `pip install 'hf_attention[ctranslate2]'`.
"""

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.utils import logging

from ..checkpoint_io_hf_attention import is_inside, replacing_folder
from ..modeling_hf_attention import HfAttentionForConditionalGeneration
from .errors import ExportError

logger = logging.get_logger(__name__)

QUANTIZATIONS = (None, "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16",
                 "float32")  # fmt: skip
ACTIVATIONS = {"relu": "RELU", "gelu": "GELU", "gelu_new": "GELUTanh", "gelu_pytorch_tanh": "GELUTanh",
               "silu": "SWISH", "swish": "SWISH"}  # fmt: skip
LAYER_NORM_EPSILON = 1e-5  # nn.LayerNorm's, which the model uses and CTranslate2's layer norm assumes


def import_ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise ExportError(
            "the ctranslate2 engine needs the ctranslate2 package: pip install 'hf_attention[ctranslate2]'."
        ) from None
    return ctranslate2


def vocabularies(model: HfAttentionForConditionalGeneration, tokenizer) -> tuple[list[str], list[str]]:
    """The source and target tokens, in id order: CTranslate2 maps ids to token strings."""
    config = model.config

    def tokens_of(mapping: dict[str, int], size: int, side: str) -> list[str]:
        tokens = [None] * size
        for token, index in mapping.items():
            if index < size:
                tokens[index] = token
        missing = [index for index, token in enumerate(tokens) if token is None]
        if missing:
            raise ExportError(
                f"the tokenizer has no {side} token for ids {missing[:3]} of the model's {size}; CTranslate2 needs "
                "one token per embedding row."
            )
        return tokens

    source = tokens_of(tokenizer.get_vocab(), config.vocab_size, "source")
    if config.target_vocab_size == config.vocab_size and not hasattr(tokenizer, "target_encoder"):
        return source, source
    target_mapping = getattr(tokenizer, "target_encoder", None)
    if target_mapping is None:
        raise ExportError(
            f"the model has a separate target vocabulary of {config.target_vocab_size} tokens, but the tokenizer "
            "holds one vocabulary."
        )
    return source, tokens_of(target_mapping, config.target_vocab_size, "target")


def check_expressible(model: HfAttentionForConditionalGeneration) -> None:
    config = model.config
    if config.activation_function not in ACTIVATIONS:
        raise ExportError(
            f"activation_function={config.activation_function!r}: CTranslate2 offers {', '.join(sorted(ACTIVATIONS))}."
        )
    norms = [module for module in model.modules() if isinstance(module, torch.nn.LayerNorm)]
    if any(norm.eps != LAYER_NORM_EPSILON or not norm.elementwise_affine for norm in norms):
        raise ExportError(f"CTranslate2's layer norm has epsilon {LAYER_NORM_EPSILON} and a scale and shift.")
    if config.encoder_attention_heads != config.decoder_attention_heads:
        raise ExportError("CTranslate2 needs as many attention heads in the decoder as in the encoder.")


def alignment_heads(model: HfAttentionForConditionalGeneration) -> tuple[int, int]:
    """The decoder layer and the number of its first heads whose mean attention CTranslate2 returns
    (`return_attention`), chosen as `hf_attention.align` aligns by default: the head guided-alignment training taught
    (head 0: the first head), else every head of the penultimate layer."""
    from .alignment import default_alignment_layer

    generation_config = getattr(model, "generation_config", None)
    taught_layer = getattr(generation_config, "alignment_layer", None)
    taught_head = getattr(generation_config, "alignment_head", None)
    if taught_layer is not None and taught_head == 0:
        return taught_layer, 1
    if taught_layer is not None:
        logger.warning(f"CTranslate2 averages a layer's first heads; the taught head {taught_head} is not the first, "
                       f"so the export aligns with all of layer {taught_layer}'s heads.")  # fmt: skip
        return taught_layer, model.config.decoder_attention_heads
    return default_alignment_layer(model), model.config.decoder_attention_heads


def build_spec(model: HfAttentionForConditionalGeneration, tokenizer):
    """CTranslate2's `TransformerSpec` holding the model's weights."""
    import_ctranslate2()
    from ctranslate2.converters import utils
    from ctranslate2.specs import common_spec, transformer_spec

    check_expressible(model)
    config = model.config
    layer, heads = alignment_heads(model)
    spec = transformer_spec.TransformerSpec.from_config(
        (config.encoder_layers, config.decoder_layers),
        config.encoder_attention_heads,
        pre_norm=config.normalize_before,
        activation=getattr(common_spec.Activation, ACTIVATIONS[config.activation_function]),
        alignment_layer=layer,
        alignment_heads=heads,
    )
    weights = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}

    def linear(target, prefix: str) -> None:
        target.weight = weights[f"{prefix}.weight"]
        if f"{prefix}.bias" in weights:
            target.bias = weights[f"{prefix}.bias"]

    def norm(target, prefix: str) -> None:
        target.gamma, target.beta = weights[f"{prefix}.weight"], weights[f"{prefix}.bias"]

    def attention(target, prefix: str, self_attention: bool) -> None:
        projections = [common_spec.LinearSpec() for _ in range(3)]
        for projection, name in zip(projections, ("q_proj", "k_proj", "v_proj"), strict=True):
            linear(projection, f"{prefix}.{name}")
        if self_attention:
            utils.fuse_linear(target.linear[0], projections)
        else:
            utils.fuse_linear(target.linear[0], projections[:1])
            utils.fuse_linear(target.linear[1], projections[1:])
        linear(target.linear[-1], f"{prefix}.out_proj")

    positions = torch.arange(config.max_position_embeddings)
    for side, stack_spec, stack in (("encoder", spec.encoder, model.model.encoder),
                                    ("decoder", spec.decoder, model.model.decoder)):  # fmt: skip
        prefix = f"model.{side}"
        stack_spec.scale_embeddings = stack.embed_tokens.embed_scale
        embeddings = stack_spec.embeddings[0] if isinstance(stack_spec.embeddings, list) else stack_spec.embeddings
        embeddings.weight = weights[f"{prefix}.embed_tokens.weight"]
        with torch.no_grad():  # the sinusoids of either layout (or the learned table), written out per position
            stack_spec.position_encodings.encodings = stack.embed_positions(positions).float()
        if config.normalize_before:
            norm(stack_spec.layer_norm, f"{prefix}.layer_norm")
        for index, layer_spec in enumerate(stack_spec.layer):
            layer = f"{prefix}.layers.{index}"
            attention(layer_spec.self_attention, f"{layer}.self_attn", self_attention=True)
            norm(layer_spec.self_attention.layer_norm, f"{layer}.self_attn_layer_norm")
            if side == "decoder":
                attention(layer_spec.attention, f"{layer}.encoder_attn", self_attention=False)
                norm(layer_spec.attention.layer_norm, f"{layer}.encoder_attn_layer_norm")
            linear(layer_spec.ffn.linear_0, f"{layer}.fc1")
            linear(layer_spec.ffn.linear_1, f"{layer}.fc2")
            norm(layer_spec.ffn.layer_norm, f"{layer}.final_layer_norm")
    linear(spec.decoder.projection, "lm_head")
    if "final_logits_bias" in weights:
        spec.decoder.projection.bias = weights["final_logits_bias"].squeeze(0)

    source_tokens, target_tokens = vocabularies(model, tokenizer)
    spec.register_source_vocabulary(source_tokens)
    spec.register_target_vocabulary(target_tokens)
    spec.config.bos_token = target_tokens[config.bos_token_id] if config.bos_token_id is not None else "<s>"
    spec.config.eos_token = target_tokens[config.eos_token_id]
    spec.config.unk_token = tokenizer.unk_token or target_tokens[0]
    spec.config.decoder_start_token = target_tokens[config.decoder_start_token_id]
    spec.config.add_source_bos = spec.config.add_source_eos = False  # the tokenizer's tokens are passed as they are
    return spec


def export_ctranslate2(
    model_dir: str | Path, output_dir: str | Path, quantization: str | None = None, overwrite: bool = False
) -> Path:
    """Write `model_dir`'s model (and tokenizer) as a CTranslate2 model folder; returns `output_dir`.

    Args:
        quantization: CTranslate2's weight type (`int8`, `int8_float32`, `float16`, `bfloat16`, ...; None: float32).
        overwrite: replace an existing `output_dir` (only once the new folder is complete).

    Raises:
        ExportError: ctranslate2 is not installed, an unknown quantization, a model CTranslate2 cannot express, or an
            existing `output_dir` without `overwrite`. Nothing is written then.
    """
    ctranslate2 = import_ctranslate2()
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"--quantization {quantization}: must be one of {', '.join(map(str, QUANTIZATIONS[1:]))}.")
    output_dir = Path(output_dir)
    if is_inside(model_dir, output_dir):
        raise ExportError(f"DESTINATION {output_dir} holds SOURCE {model_dir}: the export would replace its own "
                          "input; choose another folder.")  # fmt: skip
    if output_dir.exists() and not overwrite:
        raise ExportError(f"{output_dir} already exists; pass --overwrite to replace it.")
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    if not isinstance(model, HfAttentionForConditionalGeneration):
        raise ExportError(f"{model_dir} holds a {type(model).__name__}, not an hf_attention model.")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = build_spec(model.eval(), tokenizer)

    class SpecConverter(ctranslate2.converters.Converter):
        def _load(self):
            return spec

    with replacing_folder(output_dir, carry_over=False) as staging:  # renamed into place once complete
        SpecConverter().convert(str(staging), quantization=quantization, force=True)
        tokenizer.save_pretrained(staging)
        for name in ("generation_config.json",):
            if (Path(model_dir) / name).is_file():
                shutil.copy2(Path(model_dir) / name, staging / name)
    return output_dir
