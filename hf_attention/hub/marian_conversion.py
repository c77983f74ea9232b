"""Convert transformers' Marian translation models (`MarianMTModel`, the opus-mt family) to hf_attention and back.

Marian is the paper's architecture (post-LN, sinusoidal positions, shared and scaled embeddings) with three
conventions of its own, each reproduced by an `HfAttentionConfig` option: its sinusoid table holds all sines then all
cosines (`sinusoidal_layout="split"`), it adds `final_logits_bias` to the logits (`add_final_logits_bias`), and it may
have a separate target vocabulary (`decoder_vocab_size`). The checkpoint keys are the same, so the weights copy over
unchanged, except Marian's stored sinusoid tables, which hf_attention computes instead.

Going back, an hf_attention model in the paper's interleaved layout is converted by permuting the model dimension
(sine dimensions first, then cosine dimensions) in every weight that reads or writes the residual stream; attention
scores, feed-forward activations and logits are unchanged by the permutation.
"""

import copy
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import ModelCard, snapshot_download
from safetensors import SafetensorError
from transformers import AutoTokenizer, HfArgumentParser, MarianConfig, MarianMTModel
from transformers.utils import logging

from .. import __version__
from ..checkpoint_io_hf_attention import replacing_folder
from ..configuration_hf_attention import HfAttentionConfig
from ..modeling_hf_attention import HfAttentionForConditionalGeneration, SinusoidalPositionalEncoding

logger = logging.get_logger(__name__)

# MarianConfig fields that mean the same in HfAttentionConfig and are copied as they are.
SHARED_FIELDS = (
    "vocab_size",
    "decoder_vocab_size",
    "d_model",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "activation_function",
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "max_position_embeddings",
    "scale_embedding",
    "share_encoder_decoder_embeddings",
    "tie_word_embeddings",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "is_encoder_decoder",
    "dtype",
)
# What every MarianMTModel is, in HfAttentionConfig terms.
MARIAN_ARCHITECTURE = {
    "position_embedding_type": "sinusoidal",
    "sinusoidal_layout": "split",
    "normalize_before": False,
}
# MarianConfig fields with no HfAttentionConfig counterpart, and where each goes.
MARIAN_ONLY_FIELDS = {
    "forced_eos_token_id": "a generation setting: carried in generation_config.json",
    "init_std": "initialisation of new weights only; hf_attention initialises Xavier-uniform",
    "encoder_layerdrop": "training-only LayerDrop; must be 0 (or ignored with ignore_layerdrop=True)",
    "decoder_layerdrop": "training-only LayerDrop; must be 0 (or ignored with ignore_layerdrop=True)",
    "is_decoder": "used by MarianForCausalLM only; must be False",
}
# Keys of configs written before transformers 4.x's Marian clean-up, which MarianMTModel ignores, with the value
# that matches what MarianMTModel computes. The conversion reproduces MarianMTModel, so it warns about the others.
LEGACY_FIELDS_IGNORED_BY_MARIAN = {
    "normalize_before": False,
    "add_final_layer_norm": False,
    "normalize_embedding": False,
    "static_position_embeddings": True,
    "add_bias_logits": False,
}
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".ot", ".pt", ".pth")
REWRITTEN_FILES = {"config.json", "generation_config.json", "README.md"}


class UnsupportedMarianOption(ValueError):
    """A Marian (or hf_attention) option the other side cannot reproduce exactly."""


def hf_attention_config_from_marian(
    marian_config: MarianConfig, add_final_logits_bias: bool = True, ignore_layerdrop: bool = False
) -> HfAttentionConfig:
    """The HfAttentionConfig computing what `MarianMTModel(marian_config)` computes.

    Raises:
        UnsupportedMarianOption: LayerDrop (unless `ignore_layerdrop`), `is_decoder`, or a shared embedding with a
            different `decoder_vocab_size`.
    """
    for name in ("encoder_layerdrop", "decoder_layerdrop"):
        if getattr(marian_config, name) > 0 and not ignore_layerdrop:
            raise UnsupportedMarianOption(
                f"`{name}={getattr(marian_config, name)}`: hf_attention has no LayerDrop. It only acts in "
                "training, so pass ignore_layerdrop=True (--ignore_layerdrop) to convert for inference or to "
                "fine-tune without it."
            )
    if marian_config.is_decoder:
        raise UnsupportedMarianOption("`is_decoder=True` describes a MarianForCausalLM, not a translation model.")
    if marian_config.share_encoder_decoder_embeddings and marian_config.decoder_vocab_size != marian_config.vocab_size:
        raise UnsupportedMarianOption(
            f"`decoder_vocab_size={marian_config.decoder_vocab_size}` differs from `vocab_size="
            f"{marian_config.vocab_size}` while `share_encoder_decoder_embeddings=True`: MarianMTModel itself builds "
            "mismatched matrices from this config."
        )
    for name, marian_value in LEGACY_FIELDS_IGNORED_BY_MARIAN.items():
        value = getattr(marian_config, name, marian_value)
        if value != marian_value:
            logger.warning(
                f"Marian config has legacy `{name}={value}`, which MarianMTModel ignores (it computes `{name}="
                f"{marian_value}`); the converted model reproduces MarianMTModel."
            )
    fields = {name: getattr(marian_config, name) for name in SHARED_FIELDS}
    return HfAttentionConfig(**fields, **MARIAN_ARCHITECTURE, add_final_logits_bias=add_final_logits_bias)


def marian_config_from_hf_attention(config: HfAttentionConfig, forced_eos_token_id: int | None = None) -> MarianConfig:
    """The MarianConfig of the same architecture; the sinusoid layout is handled by `hf_attention_to_marian`.

    Raises:
        UnsupportedMarianOption: learned positions or pre-LN layers, which MarianMTModel does not have.
    """
    if config.position_embedding_type != "sinusoidal":
        raise UnsupportedMarianOption(
            f"`position_embedding_type={config.position_embedding_type!r}`: MarianMTModel only has sinusoidal "
            "positions."
        )
    if config.normalize_before:
        raise UnsupportedMarianOption("`normalize_before=True`: MarianMTModel only has post-LN layers (the paper's).")
    fields = {name: getattr(config, name) for name in SHARED_FIELDS}
    fields["decoder_vocab_size"] = config.target_vocab_size
    return MarianConfig(**fields, forced_eos_token_id=forced_eos_token_id)


def marian_to_hf_attention(
    marian: MarianMTModel, ignore_layerdrop: bool = False
) -> HfAttentionForConditionalGeneration:
    """An hf_attention model with Marian's weights that computes the same logits and generations.

    Raises:
        UnsupportedMarianOption: see `hf_attention_config_from_marian`, or stored position tables that are not
            Marian's sinusoid (hf_attention computes positions instead of storing them).
    """
    marian_config = copy.deepcopy(marian.config)
    state_dict = dict(marian.state_dict())
    for stack in ("encoder", "decoder"):
        table = state_dict.pop(f"model.{stack}.embed_positions.weight")
        sinusoid = SinusoidalPositionalEncoding(marian_config.d_model, "split")(torch.arange(table.shape[0]))
        if not torch.allclose(table.float(), sinusoid, atol=1e-6):
            raise UnsupportedMarianOption(
                f"`model.{stack}.embed_positions.weight` is not Marian's sinusoid table (trained or edited position "
                "embeddings), which hf_attention cannot reproduce."
            )
    add_final_logits_bias = bool(state_dict["final_logits_bias"].any())
    if not add_final_logits_bias:
        del state_dict["final_logits_bias"]

    # Differs between transformers versions: in 5.x MarianMTModel with shared embeddings but untied output ties
    # nothing, so `model.shared` goes unused and encoder and decoder keep matrices of their own.
    if marian_config.share_encoder_decoder_embeddings and not marian_config.tie_word_embeddings:
        shared = state_dict["model.shared.weight"]
        if not all(torch.equal(state_dict[f"model.{s}.embed_tokens.weight"], shared) for s in ("encoder", "decoder")):
            logger.warning(
                "This MarianMTModel shares no embedding (shared embeddings, untied output: transformers 5 ties none "
                "of them), so it converts to separate encoder and decoder embeddings; `model.shared.weight`, which "
                "MarianMTModel never uses, is dropped."
            )
            marian_config.share_encoder_decoder_embeddings = False
            del state_dict["model.shared.weight"]

    config = hf_attention_config_from_marian(marian_config, add_final_logits_bias, ignore_layerdrop)
    model = HfAttentionForConditionalGeneration(config).to(marian.dtype)
    model.load_state_dict(state_dict, strict=True)
    model.generation_config = copy.deepcopy(marian.generation_config)
    return model.eval() if not marian.training else model


def split_layout_permutation(d_model: int) -> torch.Tensor:
    """Model dimensions reordered from the interleaved sinusoid layout to the split one: evens, then odds."""
    return torch.cat((torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)))


def permute_model_dimension(state_dict: dict[str, torch.Tensor], permutation: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reorder the model dimension D in every tensor that reads or writes the residual stream.

    Layer norms act on each dimension alike, so permuting their parameters with the stream keeps them exact.
    """
    permuted = {}
    for key, tensor in state_dict.items():
        module, _, kind = key.rpartition(".")
        if module.endswith(("embed_tokens", "shared", "lm_head", "q_proj", "k_proj", "v_proj", "fc1")):
            tensor = tensor[:, permutation] if kind == "weight" else tensor  # reads D: (out, D)
        elif module.endswith(("out_proj", "fc2")):
            tensor = tensor[permutation]  # writes D: weight (D, in), bias (D,)
        elif module.endswith("layer_norm"):
            tensor = tensor[permutation]
        permuted[key] = tensor.contiguous()
    return permuted


def hf_attention_to_marian(model: HfAttentionForConditionalGeneration) -> MarianMTModel:
    """A MarianMTModel that computes the same logits and generations as `model`.

    Raises:
        UnsupportedMarianOption: see `marian_config_from_hf_attention`.
    """
    config = model.config
    marian_config = marian_config_from_hf_attention(config, model.generation_config.forced_eos_token_id)
    state_dict = dict(model.state_dict())
    if config.sinusoidal_layout == "interleaved":
        state_dict = permute_model_dimension(state_dict, split_layout_permutation(config.d_model))
    if config.share_encoder_decoder_embeddings and not config.tie_word_embeddings:
        logger.warning(
            "Shared embeddings with an untied output: the MarianMTModel gets three equal embedding matrices, which "
            "transformers 5 does not tie, so fine-tuning it would let them drift apart."
        )
    marian = MarianMTModel(marian_config).to(model.dtype)
    marian_state = marian.state_dict()
    if "final_logits_bias" not in state_dict:
        state_dict["final_logits_bias"] = torch.zeros_like(marian_state["final_logits_bias"])
    for stack in ("encoder", "decoder"):
        key = f"model.{stack}.embed_positions.weight"
        state_dict[key] = marian_state[key]
    marian.load_state_dict(state_dict, strict=True)
    marian.generation_config = copy.deepcopy(model.generation_config)
    return marian.eval() if not model.training else marian


def convert_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    overwrite: bool = False,
    ignore_layerdrop: bool = False,
) -> str:
    """Convert a checkpoint folder (or Hub repo id) between MarianMTModel and hf_attention.

    The direction follows from `model_type` in the source's config.json. The destination gets the converted
    weights (safetensors), config, generation config, the source's tokenizer and other files unchanged, and a model
    card that says where the model came from. It is written to a staging folder and swapped into place, so a failed
    or killed conversion leaves the destination as it was.

    Returns:
        The destination's model type: `"hf_attention"` or `"marian"`.

    Raises:
        FileNotFoundError: no such folder, or no config.json in it.
        OSError: the Hub repo cannot be downloaded (not found, offline, ...).
        FileExistsError: the destination holds files and `overwrite` is False.
        ValueError: the source is neither a Marian nor an hf_attention model, or uses an option the other side
            cannot reproduce (`UnsupportedMarianOption`).
    """
    source_dir = _checkpoint_folder(source)
    destination = Path(destination)
    config_file = source_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"No config.json in {source_dir}: not a transformers checkpoint folder.")
    if destination.exists() and any(destination.iterdir()) and not overwrite:
        raise FileExistsError(f"{destination} is not empty; pass overwrite=True (--overwrite) to replace it.")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")

    permuted = False
    if model_type == "marian":
        try:
            marian = MarianMTModel.from_pretrained(source_dir)
        except SafetensorError as error:
            raise OSError(
                f"The weights of {source} cannot be read ({error}): the file is truncated or corrupted."
            ) from error
        converted = marian_to_hf_attention(marian, ignore_layerdrop)
    elif model_type == HfAttentionConfig.model_type:
        original = HfAttentionForConditionalGeneration.from_pretrained(source_dir)
        permuted = original.config.sinusoidal_layout == "interleaved"
        converted = hf_attention_to_marian(original)
    else:
        raise ValueError(
            f"{config_file} has model_type {model_type!r}; convert_checkpoint reads 'marian' or 'hf_attention'."
        )
    target_type = converted.config.model_type

    with replacing_folder(destination, carry_over=False) as staging:
        converted.save_pretrained(staging)
        for path in sorted(source_dir.iterdir()):
            if _carried_over(path, written=staging):
                shutil.copy2(path, staging / path.name)
        _record_tokenizer_class(source_dir, staging)
        _write_model_card(source, source_dir, staging, model_type, target_type, permuted)
    logger.info(f"Converted {model_type} checkpoint {source} to {target_type} in {destination}.")
    return target_type


def _checkpoint_folder(source: str | os.PathLike) -> Path:
    """A local folder as it is; anything shaped like a Hub repo id ("owner/name") is downloaded."""
    path = Path(source)
    if path.is_dir():
        return path
    looks_local = path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"No checkpoint folder at {source}.")
    return Path(snapshot_download(str(source)))


def _carried_over(path: Path, written: Path) -> bool:
    """Tokenizer and other files travel unchanged; weights, configs, code and the card are written anew."""
    return (
        path.is_file()
        and not path.name.startswith(".")
        and path.name not in REWRITTEN_FILES
        and not path.name.endswith(WEIGHT_FILE_SUFFIXES + (".index.json", ".py"))
        and not (written / path.name).exists()
    )


def _record_tokenizer_class(source_dir: Path, staging: Path) -> None:
    """Name the tokenizer's class in the converted tokenizer_config.json where the source left it out.

    opus-mt repos do: AutoTokenizer then finds MarianTokenizer through config.json's model_type "marian", which the
    converted checkpoint no longer has, so without the class it cannot load the original tokenizer.
    """
    settings_file = staging / "tokenizer_config.json"
    if not settings_file.is_file():
        return
    settings = json.loads(settings_file.read_text(encoding="utf-8"))
    if settings.get("tokenizer_class"):
        return
    try:
        settings["tokenizer_class"] = type(AutoTokenizer.from_pretrained(source_dir)).__name__
    except (ImportError, OSError, ValueError) as error:
        if not (source_dir / "source.spm").is_file():
            logger.warning(f"The tokenizer class of {source_dir} is unknown ({error}); tokenizer_config.json is kept.")
            return
        settings["tokenizer_class"] = "MarianTokenizer"  # the opus-mt layout: source.spm, target.spm, vocab.json
        logger.warning("MarianTokenizer needs sentencepiece: pip install 'hf_attention[marian]'.")
    settings_file.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_model_card(
    source: str | os.PathLike, source_dir: Path, staging: Path, from_type: str, to_type: str, permuted: bool
) -> None:
    """The source's card (if any) with its metadata, plus a section saying where this checkpoint came from."""
    weights_note = (
        "The weights are the original ones, reordered along the model dimension from hf_attention's interleaved "
        "sinusoid layout to Marian's split one."
        if permuted
        else "The weights are the original ones, unchanged."
    )
    source_card = source_dir / "README.md"
    empty_card = "---\nlibrary_name: transformers\n---\n"
    card = ModelCard.load(source_card) if source_card.is_file() else ModelCard(empty_card)
    tags = list(card.data.tags or [])
    card.data.tags = tags + [tag for tag in ("translation", "marian", "hf_attention") if tag not in tags]
    card.data.library_name = "transformers"
    if not Path(source).is_dir():
        card.data.base_model = str(source)
    section = (
        "## Conversion\n\n"
        f"Converted from the {from_type} checkpoint `{source}` to {to_type} with hf_attention {__version__} "
        f"(`python scripts/convert_marian.py {source} <destination>`). {weights_note} Logits agree with the "
        "original model's within float32 rounding, and generations are the same.\n"
    )
    card.text = f"{card.text.strip()}\n\n{section}" if card.text.strip() else section
    card.save(staging / "README.md")


@dataclass
class ConversionArguments:
    overwrite: bool = field(default=False, metadata={"help": "Replace what DESTINATION already holds."})
    ignore_layerdrop: bool = field(
        default=False, metadata={"help": "Convert a Marian model with LayerDrop > 0 without it (training-only)."}
    )


def main(argv: list[str] | None = None) -> None:
    """`convert_marian.py SOURCE DESTINATION [--overwrite] [--ignore_layerdrop]`."""
    parser = HfArgumentParser(ConversionArguments, description=__doc__.splitlines()[0])
    parser.add_argument("source", help="MarianMTModel or hf_attention checkpoint: a folder or a Hub repo id.")
    parser.add_argument("destination", help="Folder for the converted checkpoint.")
    args, paths = parser.parse_args_into_dataclasses(args=argv)
    try:
        target_type = convert_checkpoint(paths.source, paths.destination, args.overwrite, args.ignore_layerdrop)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"{paths.source} -> {paths.destination} ({target_type})")
