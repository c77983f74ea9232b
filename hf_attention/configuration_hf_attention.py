"""Configuration of the encoder-decoder Transformer of Vaswani et al. (2017), "Attention Is All You Need"."""

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.utils import logging

logger = logging.get_logger(__name__)


def require_positive_integers(values: Mapping[str, Any], error: type[Exception] = ValueError) -> None:
    """The package's one positive-integer check: `values` maps a label (`--num_beams`, `` `d_model` ``) to a value
    (None: not given); the first that is not an integer of at least 1 is refused in one line naming it.

    Raises:
        `error`: "LABEL VALUE: must be a positive integer."
    """
    for label, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise error(f"{label} {value!r}: must be a positive integer.")


@strict
class HfAttentionConfig(PreTrainedConfig):
    r"""Hyper-parameters of the Transformer (§3, Table 3), with the field names of BART / Marian.

    Paper symbol -> field: N -> `encoder_layers` / `decoder_layers`; d_model -> `d_model`;
    d_ff -> `encoder_ffn_dim` / `decoder_ffn_dim`; h -> `encoder_attention_heads` / `decoder_attention_heads`;
    P_drop -> `dropout`. Every default is the paper's "base" model; `from_preset("big")` gives Table 3's big model.

    Args:
        vocab_size: Size of the shared source/target subword vocabulary (the paper used ~37k BPE for En-De);
            the source vocabulary when `decoder_vocab_size` differs.
        decoder_vocab_size: Size of a separate target vocabulary, used only with
            `share_encoder_decoder_embeddings=False` (Marian's two-vocabulary models); None means `vocab_size`.
        d_model: Width of every sub-layer output and embedding.
        encoder_layers / decoder_layers: N, the number of stacked layers.
        encoder_attention_heads / decoder_attention_heads: h, heads per multi-head attention.
        encoder_ffn_dim / decoder_ffn_dim: d_ff, inner width of the position-wise feed-forward network.
        activation_function: Non-linearity of the feed-forward network (the paper: ReLU).
        dropout: P_drop, applied to each sub-layer output and to the embedding sums (§5.4).
        attention_dropout: Dropout on attention probabilities (not in the paper, hence 0).
        activation_dropout: Dropout after the feed-forward non-linearity (not in the paper, hence 0).
        max_position_embeddings: Longest sequence; a hard limit only for learned positions.
        position_embedding_type: `"sinusoidal"` (§3.5) or `"learned"` (the variant of Table 3, row E).
        sinusoidal_layout: Where the sines and cosines of §3.5 sit in each position vector: `"interleaved"` (the
            paper's formula: dimension 2i sine, 2i+1 cosine) or `"split"` (all sines, then all cosines, as in
            tensor2tensor and Marian). Same frequencies; a permutation of the dimensions.
        normalize_before: Differs from paper when True: pre-LN layers, x + Sublayer(LayerNorm(x)), plus a
            final LayerNorm on each stack; trains more stably in deep or warm-up-free settings.
        scale_embedding: Multiply token embeddings by sqrt(d_model) (§3.4).
        share_encoder_decoder_embeddings: One embedding matrix for source and target tokens (§3.4).
        tie_word_embeddings: The pre-softmax projection shares the (target) embedding matrix (§3.4).
        add_final_logits_bias: Add a fixed bias vector (a buffer, not trained) to the logits, as Marian and BART do.
        use_cache: Keep keys/values of earlier target positions while generating.
        pad_token_id / bos_token_id / eos_token_id / decoder_start_token_id: Special token ids.

    Example:

    ```python
    >>> from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration
    >>> config = HfAttentionConfig.from_preset("tiny", vocab_size=100)
    >>> model = HfAttentionForConditionalGeneration(config)
    >>> config.d_model, config.num_hidden_layers
    (64, 2)

    ```
    """

    model_type = "hf_attention"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["cache"]
    attribute_map: ClassVar[dict[str, str]] = {
        "num_attention_heads": "encoder_attention_heads",
        "hidden_size": "d_model",
        "num_hidden_layers": "encoder_layers",
    }

    vocab_size: int = 37000
    decoder_vocab_size: int | None = None
    d_model: int = 512
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    activation_function: str = "relu"
    dropout: float | int = 0.1
    attention_dropout: float | int = 0.0
    activation_dropout: float | int = 0.0
    max_position_embeddings: int = 1024
    position_embedding_type: Literal["sinusoidal", "learned"] = "sinusoidal"
    sinusoidal_layout: Literal["interleaved", "split"] = "interleaved"
    normalize_before: bool = False
    scale_embedding: bool = True
    share_encoder_decoder_embeddings: bool = True
    tie_word_embeddings: bool = True
    add_final_logits_bias: bool = False
    use_cache: bool = True
    is_encoder_decoder: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    decoder_start_token_id: int | None = 1

    def __post_init__(self, **kwargs):
        # As in MarianConfig: always a number, since transformers reads it as the decoder's `vocab_size`.
        if self.share_encoder_decoder_embeddings and self.decoder_vocab_size not in (None, self.vocab_size):
            logger.warning(
                f"`decoder_vocab_size` ({self.decoder_vocab_size}) is ignored: with "
                f"`share_encoder_decoder_embeddings=True` the target vocabulary is `vocab_size` ({self.vocab_size})."
            )
        if self.share_encoder_decoder_embeddings or self.decoder_vocab_size is None:
            self.decoder_vocab_size = self.vocab_size
        super().__post_init__(**kwargs)
        # `@strict` runs the `validate_*` methods too, but wraps their errors in its own exception type;
        # running the checks here first gives callers the plain ValueError that names the field.
        self.validate_architecture()

    def validate_architecture(self):
        """Cross-field rules: positive sizes, heads that divide d_model, probabilities, token ids in the vocabulary.

        Runs on construction and again whenever a model is built from the config, so a field changed after
        construction (`config.encoder_attention_heads = 5`) fails with its name rather than inside a reshape.
        """
        sizes = ("vocab_size", "decoder_vocab_size", "d_model", "encoder_layers", "decoder_layers",
                 "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
                 "max_position_embeddings")  # fmt: skip
        require_positive_integers({f"`{name}`": getattr(self, name) for name in sizes})
        for heads_field in ("encoder_attention_heads", "decoder_attention_heads"):
            heads = getattr(self, heads_field)
            if self.d_model % heads != 0:
                raise ValueError(f"`d_model` ({self.d_model}) must be divisible by `{heads_field}` ({heads}).")
        if self.activation_function not in ACT2FN:
            raise ValueError(
                f"`activation_function` must be one of {sorted(ACT2FN)}, got {self.activation_function!r}."
            )
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value}.")
        # The pad id serves both sides; bos/eos/decoder start are target tokens.
        vocab_limit = min(self.vocab_size, self.target_vocab_size)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            for token_id in value if isinstance(value, list) else [value]:
                if token_id is not None and not 0 <= token_id < vocab_limit:
                    raise ValueError(
                        f"`{name}` must lie in [0, {vocab_limit}) (the smaller of vocab_size and decoder_vocab_size), "
                        f"got {token_id}."
                    )

    @property
    def target_vocab_size(self) -> int:
        """Rows of the decoder embedding and outputs of the pre-softmax projection.

        With shared embeddings this is `vocab_size`, even if `vocab_size` was changed after `decoder_vocab_size`
        was filled in.
        """
        if self.share_encoder_decoder_embeddings or self.decoder_vocab_size is None:
            return self.vocab_size
        return self.decoder_vocab_size

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "HfAttentionConfig":
        """A config from a named preset (`"base"`, `"big"` from Table 3, or `"tiny"`), with fields overridden.

        Raises:
            ValueError: `name` is not a preset.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


# Table 3 of the paper. "big" uses P_drop 0.3, the value given for En-De (the paper used 0.1 for En-Fr).
PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "big": {
        "d_model": 1024,
        "encoder_ffn_dim": 4096,
        "decoder_ffn_dim": 4096,
        "encoder_attention_heads": 16,
        "decoder_attention_heads": 16,
        "dropout": 0.3,
    },
    "tiny": {
        "d_model": 64,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 256,
        "decoder_ffn_dim": 256,
        "max_position_embeddings": 256,
    },
}

__all__ = ["HfAttentionConfig", "PRESETS"]
