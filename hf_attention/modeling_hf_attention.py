"""The encoder-decoder Transformer of Vaswani et al. (2017), "Attention Is All You Need", as a Hugging Face model.

Section map (paper -> code, in file order):
    §3.2.1 scaled dot-product attention   -> `eager_attention_forward` (attention_hf_attention.py; other back-ends
                                             via `ALL_ATTENTION_FUNCTIONS`)
    §3.2.2 multi-head attention           -> `MultiHeadAttention` (attention_hf_attention.py)
    §3.3   position-wise feed-forward     -> `PositionwiseFeedForward`
    §3.4   embeddings scaled by √d_model  -> `ScaledWordEmbedding`
    §3.5   positional encoding            -> `SinusoidalPositionalEncoding`, `LearnedPositionalEmbedding`
    §3.1   encoder and decoder layers     -> `EncoderLayer`, `DecoderLayer`; stacks `HfAttentionEncoder`/`Decoder`
    §3.4   pre-softmax linear projection  -> `HfAttentionForConditionalGeneration.lm_head`
    §5.4   residual dropout; label smoothing -> `SublayerConnection` (`apply_dropout`); `label_smoothed_cross_entropy`
    input checks                          -> the last section: each input named when it is wrong

Shape legend: B batch, S source length, T target length, K key length, D d_model, H heads, Dh = D/H,
F ffn dim, V vocab.
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, is_torchdynamo_compiling
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention_hf_attention import MultiHeadAttention, eager_attention_forward, padded  # noqa: F401 (re-exported)
from .checkpoint_io_hf_attention import CheckpointIOMixin
from .configuration_hf_attention import HfAttentionConfig
from .dropout_hf_attention import apply_dropout
from .generation_hf_attention import HfAttentionGenerationMixin
from .loss_hf_attention import label_smoothed_cross_entropy


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs from labels (teacher forcing): prepend the start token, drop the last token, -100 -> pad."""
    if pad_token_id is None:
        raise ValueError("`config.pad_token_id` must be set to build decoder inputs from labels.")
    shifted_input_ids = input_ids.new_zeros(input_ids.shape)
    shifted_input_ids[:, 1:] = input_ids[:, :-1].clone()
    shifted_input_ids[:, 0] = decoder_start_token_id
    shifted_input_ids.masked_fill_(shifted_input_ids == -100, pad_token_id)
    return shifted_input_ids


class PositionwiseFeedForward:
    """Position-wise feed-forward network, §3.3: FFN(x) = max(0, x W1 + b1) W2 + b2.

    A mixin rather than a submodule, so that `fc1` / `fc2` sit directly on each layer and the checkpoint keys stay
    those of BART and Marian (`layers.{i}.fc1.weight`), which conversion and users rely on.
    """

    def init_feed_forward(self, config: HfAttentionConfig, ffn_dim: int) -> None:
        self.activation_fn = ACT2FN[config.activation_function]
        self.activation_dropout = config.activation_dropout
        self.fc1 = nn.Linear(config.d_model, ffn_dim)  # W1, b1
        self.fc2 = nn.Linear(ffn_dim, config.d_model)  # W2, b2

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_fn(self.fc1(hidden_states))  # (B, T, F)
        hidden_states = apply_dropout(hidden_states, self.activation_dropout, self.training)
        return self.fc2(hidden_states)  # (B, T, D)


class ScaledWordEmbedding(nn.Embedding):
    """Token embeddings, §3.4: "we multiply those weights by √d_model" (scale 1 when `scale_embedding=False`).

    The scale is applied here, not stored in the weight, so the tied pre-softmax projection uses the unscaled matrix
    as in the paper.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, embed_scale: float):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale


class SinusoidalPositionalEncoding(nn.Module):
    """Sinusoidal positional encoding, §3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(...).

    Computed on the fly (no weights, nothing to save or initialise), so any length works, as the paper intended:
    "it may allow the model to extrapolate to sequence lengths longer than the ones encountered during training".
    With `layout="split"` the same values sit as [all sines, all cosines] (tensor2tensor's and Marian's order).
    """

    def __init__(self, embedding_dim: int, layout: str = "interleaved"):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.layout = layout

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Args: position_ids: (L,). Returns: the encodings (L, D) in float32."""
        # Angles in float64 (MPS has none: CPU there), so the values match a float64-built table to the last bit.
        device = position_ids.device if position_ids.device.type != "mps" else torch.device("cpu")
        frequency_index = torch.arange(0, self.embedding_dim, 2, device=device, dtype=torch.float64)
        inverse_frequency = 1.0 / 10000.0 ** (frequency_index / self.embedding_dim)  # 10000^(-2i/D): (ceil(D/2),)
        angles = position_ids.to(device, torch.float64)[:, None] * inverse_frequency[None, :]  # (L, ceil(D/2))
        if self.layout == "split":
            encoding = torch.cat((angles.sin(), angles.cos()[:, : self.embedding_dim // 2]), dim=-1)  # (L, D)
        else:
            encoding = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)[:, : self.embedding_dim]  # (L, D)
        return encoding.to(position_ids.device, torch.float32)


class LearnedPositionalEmbedding(nn.Embedding):
    """Learned positional embeddings, the alternative of §3.5 (Table 3, row E); at most `max_position_embeddings`."""


class SublayerConnection:
    """Residual connection and layer normalisation around each sub-layer, §3.1 and §5.4 (mixin for both layers).

    Paper (post-LN): LayerNorm(x + Dropout(Sublayer(x))).
    Differs from paper when `normalize_before`: x + Dropout(Sublayer(LayerNorm(x))) (pre-LN).
    """

    def add_and_norm(
        self, hidden_states: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor], layer_norm: nn.LayerNorm
    ) -> torch.Tensor:
        residual = hidden_states
        if self.normalize_before:
            hidden_states = layer_norm(hidden_states)
        hidden_states = sublayer(hidden_states)
        hidden_states = apply_dropout(hidden_states, self.dropout, self.training)
        hidden_states = residual + hidden_states
        if not self.normalize_before:
            hidden_states = layer_norm(hidden_states)
        return hidden_states


class EncoderLayer(SublayerConnection, PositionwiseFeedForward, GradientCheckpointingLayer):
    """Encoder layer, §3.1: multi-head self-attention, then the position-wise feed-forward network."""

    def __init__(self, config: HfAttentionConfig, layer_idx: int | None = None):
        super().__init__()
        self.dropout = config.dropout
        self.normalize_before = config.normalize_before
        self.self_attn = MultiHeadAttention(config, config.encoder_attention_heads, layer_idx=layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.init_feed_forward(config, config.encoder_ffn_dim)
        self.final_layer_norm = nn.LayerNorm(config.d_model)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        tokens: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """Args: hidden_states: (B, S, D), or the rows of `tokens` only, (tokens, D) (see `HfAttentionEncoder`).
        Returns: the same shape."""
        hidden_states = self.add_and_norm(
            hidden_states,
            lambda x: self.self_attn(x, attention_mask=attention_mask, tokens=tokens, **kwargs)[0],
            self.self_attn_layer_norm,
        )
        return self.add_and_norm(hidden_states, self.feed_forward, self.final_layer_norm)


class DecoderLayer(SublayerConnection, PositionwiseFeedForward, GradientCheckpointingLayer):
    """Decoder layer, §3.1: masked self-attention, encoder-decoder attention, then the feed-forward network."""

    def __init__(self, config: HfAttentionConfig, layer_idx: int | None = None):
        super().__init__()
        self.dropout = config.dropout
        self.normalize_before = config.normalize_before
        heads = config.decoder_attention_heads
        self.self_attn = MultiHeadAttention(config, heads, is_causal=True, layer_idx=layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.encoder_attn = MultiHeadAttention(config, heads, layer_idx=layer_idx)
        self.encoder_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.init_feed_forward(config, config.decoder_ffn_dim)
        self.final_layer_norm = nn.LayerNorm(config.d_model)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = True,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """Args: hidden_states: (B, T, D); encoder_hidden_states: (B, S, D). Returns: (B, T, D)."""
        hidden_states = self.add_and_norm(
            hidden_states,
            lambda x: self.self_attn(x, cache=cache, attention_mask=attention_mask, **kwargs)[0],
            self.self_attn_layer_norm,
        )
        if encoder_hidden_states is not None:
            hidden_states = self.add_and_norm(
                hidden_states,
                lambda x: self.encoder_attn(
                    x,
                    key_value_states=encoder_hidden_states,
                    attention_mask=encoder_attention_mask,
                    cache=cache,
                    **kwargs,
                )[0],
                self.encoder_attn_layer_norm,
            )
        return self.add_and_norm(hidden_states, self.feed_forward, self.final_layer_norm)


class HfAttentionPreTrainedModel(CheckpointIOMixin, PreTrainedModel):
    """Weight initialisation and the class attributes transformers reads (attention back-ends, sharding, ...).

    Saving and loading (atomic saves, strict loads) come from `CheckpointIOMixin` in checkpoint_io_hf_attention.py.
    """

    config: HfAttentionConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EncoderLayer", "DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    # A static cache under torch.compile(fullgraph=True) decodes as eager decoding does (tests/test_inference.py).
    _can_compile_fullgraph = True

    def __init__(self, config: HfAttentionConfig, *inputs, **kwargs):
        config.validate_architecture()  # fields may have been changed since the config was built
        super().__init__(config, *inputs, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """Xavier-uniform for every matrix, as in the reference code (tensor2tensor) and the Annotated Transformer."""
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.xavier_uniform_(module.weight)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, HfAttentionForConditionalGeneration) and module.config.add_final_logits_bias:
            init.zeros_(module.final_logits_bias)

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Resize the shared vocabulary: both embeddings, the pre-softmax projection and the final logits bias.

        Raises:
            ValueError: the model has separate source and target vocabularies, which one size cannot describe.
        """
        if not self.config.share_encoder_decoder_embeddings:
            raise ValueError(
                "`resize_token_embeddings` resizes one shared vocabulary, but this model has separate source and "
                "target vocabularies (`share_encoder_decoder_embeddings=False`)."
            )
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        self.config.decoder_vocab_size = self.config.vocab_size
        final_logits_bias = getattr(self, "final_logits_bias", None)
        if final_logits_bias is not None and final_logits_bias.shape[-1] != self.config.vocab_size:
            new_bias = final_logits_bias.new_zeros(1, self.config.vocab_size)
            kept = min(final_logits_bias.shape[-1], self.config.vocab_size)
            new_bias[:, :kept] = final_logits_bias[:, :kept]
            self.final_logits_bias = new_bias
        return embeddings


class TransformerStack(HfAttentionPreTrainedModel):
    """What the encoder and decoder stacks share: token and position embeddings, their dropout, the final norm."""

    def __init__(self, config: HfAttentionConfig, vocab_size: int):
        super().__init__(config)
        embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_tokens = ScaledWordEmbedding(vocab_size, config.d_model, config.pad_token_id, embed_scale)
        if config.position_embedding_type == "learned":
            self.embed_positions = LearnedPositionalEmbedding(config.max_position_embeddings, config.d_model)
        else:
            self.embed_positions = SinusoidalPositionalEncoding(config.d_model, config.sinusoidal_layout)
        # Differs from paper: pre-LN stacks need a final LayerNorm, as their layers' outputs are un-normalised.
        self.layer_norm = nn.LayerNorm(config.d_model) if config.normalize_before else None

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def embed(self, inputs_embeds: torch.Tensor, past_length: int | torch.Tensor, name: str) -> torch.Tensor:
        """Add position encodings to token embeddings and apply dropout, §3.5 and §5.4: (B, L, D) -> (B, L, D)."""
        length = inputs_embeds.shape[1]
        if (
            self.config.position_embedding_type == "learned"
            and isinstance(past_length, int)  # a static cache's count is a tensor: not read, see the decoder
            and past_length + length > self.config.max_position_embeddings
        ):
            raise ValueError(
                f"`{name}` reaches position {past_length + length}, beyond max_position_embeddings="
                f"{self.config.max_position_embeddings} of the learned position embeddings."
            )
        position_ids = past_length + torch.arange(length, device=inputs_embeds.device)
        hidden_states = inputs_embeds + self.embed_positions(position_ids).to(inputs_embeds.dtype)  # (B, L, D)
        return apply_dropout(hidden_states, self.config.dropout, self.training)

    def final_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(hidden_states) if self.layer_norm is not None else hidden_states


class HfAttentionEncoder(TransformerStack):
    """The encoder, §3.1: a stack of N `EncoderLayer`s over the embedded source."""

    _can_record_outputs = {"hidden_states": EncoderLayer, "attentions": MultiHeadAttention}

    def __init__(self, config: HfAttentionConfig):
        super().__init__(config, config.vocab_size)
        self.layers = nn.ModuleList([EncoderLayer(config, layer_idx=i) for i in range(config.encoder_layers)])
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        skip_padding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutput:
        """Encode the source.

        Args:
            input_ids: source token ids (B, S); or `inputs_embeds` (B, S, D), already scaled.
            attention_mask: (B, S), 1 for tokens, 0 for padding.
            skip_padding: compute the position-wise parts (every product but attention's, the norms) on the tokens'
                rows only, which self-attention spreads out again (for inference: a CPU's products cost per row, and
                a batch of 32 Multi30k sentences is half padding). The output's padding positions are then zeros.

        Returns:
            `BaseModelOutput` with `last_hidden_state` (B, S, D).

        Raises:
            ValueError: both or neither of `input_ids` / `inputs_embeds`, wrong shapes, ids outside the vocabulary.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds` to the encoder.")
        if inputs_embeds is None:
            _check_token_ids("input_ids", input_ids, self.embed_tokens.num_embeddings)
            inputs_embeds = self.embed_tokens(input_ids)  # (B, S, D)
        _check_embeddings("inputs_embeds", inputs_embeds, self.config.d_model)
        batch_size, source_length = inputs_embeds.shape[:2]
        _check_padding_mask("attention_mask", attention_mask, batch_size, source_length, "input_ids")

        hidden_states = self.embed(inputs_embeds, past_length=0, name="input_ids")
        tokens = None
        if skip_padding and attention_mask is not None and not attention_mask.bool().all():
            tokens = attention_mask.bool()
            hidden_states = hidden_states[tokens]  # (tokens, D)
        attention_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask
        )
        for encoder_layer in self.layers:
            hidden_states = encoder_layer(hidden_states, attention_mask, tokens=tokens, **kwargs)
        hidden_states = self.final_norm(hidden_states)
        if tokens is not None:
            hidden_states = padded(hidden_states, tokens)
        return BaseModelOutput(last_hidden_state=hidden_states)


class HfAttentionDecoder(TransformerStack):
    """The decoder, §3.1: a stack of N `DecoderLayer`s, masked so position i sees only positions before it."""

    _can_record_outputs = {
        "hidden_states": DecoderLayer,
        "attentions": OutputRecorder(MultiHeadAttention, index=1, layer_name="self_attn"),
        "cross_attentions": OutputRecorder(MultiHeadAttention, index=1, layer_name="encoder_attn"),
    }

    def __init__(self, config: HfAttentionConfig):
        super().__init__(config, config.target_vocab_size)
        self.layers = nn.ModuleList([DecoderLayer(config, layer_idx=i) for i in range(config.decoder_layers)])
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """Decode target positions given the encoder output.

        Args:
            input_ids: target token ids (B, T), only the new ones when `cache` holds earlier steps.
            attention_mask: (B, past + T) target padding mask.
            encoder_hidden_states: (B, S, D) encoder output, or (B/k, S, D) for k consecutive targets per source
                (beam search's hypotheses, as `generate` passes them).
            encoder_attention_mask: (B, S) or (B/k, S) source padding mask.
            cache: keys/values of earlier steps; created here when `use_cache` and none is given.

        Returns:
            `BaseModelOutputWithPastAndCrossAttentions` with `last_hidden_state` (B, T, D) and `cache`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `decoder_input_ids` and `decoder_inputs_embeds` to the decoder.")
        past_length = cache.get_seq_length() if cache is not None else 0
        # A static cache counts its tokens in a tensor: reading that would stall every generated token on a GPU and
        # break torch.compile's graph, so the checks that need the count run only while it is a Python int.
        past_length_known = isinstance(past_length, int)
        if inputs_embeds is None:
            # Checked on the first step only: later steps feed back the model's own tokens, and the check's
            # device-to-host read would stall every generated token on a GPU.
            if past_length_known and past_length == 0:
                _check_token_ids("decoder_input_ids", input_ids, self.embed_tokens.num_embeddings)
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, D)
        _check_embeddings("decoder_inputs_embeds", inputs_embeds, self.config.d_model)

        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        batch_size, target_length = inputs_embeds.shape[:2]
        if past_length_known:
            expected_length = past_length + target_length
            _check_padding_mask(
                "decoder_attention_mask", attention_mask, batch_size, expected_length, "cached + new targets"
            )
        if encoder_hidden_states is not None:
            sources = encoder_hidden_states.shape[0]
            if batch_size % sources != 0:
                raise ValueError(
                    f"`encoder_outputs` hold {sources} source sequences but the decoder inputs hold {batch_size} "
                    "targets; there must be as many targets as sources, or k targets per source (consecutive)."
                )
            _check_padding_mask(
                "attention_mask", encoder_attention_mask, sources, encoder_hidden_states.shape[1], "the source"
            )

        hidden_states = self.embed(inputs_embeds, past_length=past_length, name="decoder_input_ids")
        self_attention_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        causal_mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=self_attention_cache
        )
        query_embeds = inputs_embeds
        if encoder_hidden_states is not None and encoder_hidden_states.shape[0] != batch_size:
            # One mask row per source: k targets of one source attend to it together (`MultiHeadAttention`).
            query_embeds = inputs_embeds[: encoder_hidden_states.shape[0]]
        encoder_attention_mask = create_bidirectional_mask(
            config=self.config,
            inputs_embeds=query_embeds,
            attention_mask=encoder_attention_mask,
            encoder_hidden_states=encoder_hidden_states,
        )
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                causal_mask,
                encoder_hidden_states,  # positional, for gradient checkpointing
                encoder_attention_mask=encoder_attention_mask,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=self.final_norm(hidden_states), cache=cache)


class HfAttentionModel(HfAttentionPreTrainedModel):
    """The bare encoder-decoder Transformer (Figure 1 without the final linear + softmax).

    Example:

    ```python
    >>> import torch
    >>> from hf_attention import HfAttentionConfig, HfAttentionModel
    >>> model = HfAttentionModel(HfAttentionConfig.from_preset("tiny", vocab_size=100))
    >>> out = model(input_ids=torch.tensor([[5, 6, 7, 2]]), decoder_input_ids=torch.tensor([[1, 5]]))
    >>> tuple(out.last_hidden_state.shape)
    (1, 2, 64)

    ```
    """

    def __init__(self, config: HfAttentionConfig):
        super().__init__(config)
        if config.share_encoder_decoder_embeddings:
            embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
            self.shared = ScaledWordEmbedding(config.vocab_size, config.d_model, config.pad_token_id, embed_scale)
            self._tied_weights_keys = {
                "encoder.embed_tokens.weight": "shared.weight",
                "decoder.embed_tokens.weight": "shared.weight",
            }
        self.encoder = HfAttentionEncoder(config)
        self.decoder = HfAttentionDecoder(config)
        self.post_init()

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        """Which weights `tie_weights` ties: transformers ties none when `tie_word_embeddings` is False, but the
        source and target embeddings must still be one matrix when `share_encoder_decoder_embeddings` says so."""
        tied = super().get_expanded_tied_weights_keys(all_submodels)
        if not all_submodels and self.config.share_encoder_decoder_embeddings and not tied:
            tied = dict(self._tied_weights_keys)
        return tied

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        if self.config.share_encoder_decoder_embeddings:
            self.shared = value
            self.decoder.embed_tokens = value
        self.encoder.embed_tokens = value

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: tuple[torch.Tensor] | BaseModelOutput | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqModelOutput:
        """Encode the source (unless `encoder_outputs` is given) and decode the target.

        Args:
            input_ids: source ids (B, S). attention_mask: (B, S).
            decoder_input_ids: target ids (B, T), shifted right. decoder_attention_mask: (B, past + T).
            encoder_outputs: a previous encoder pass, reused while generating.
            cache: key/value cache of earlier decoding steps.

        Returns:
            `Seq2SeqModelOutput` with the decoder's `last_hidden_state` (B, T, D).
        """
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(
                last_hidden_state=encoder_outputs[0],
                hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
                attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
            )
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


class HfAttentionForConditionalGeneration(HfAttentionPreTrainedModel, HfAttentionGenerationMixin):
    """The full Transformer of Figure 1: encoder-decoder, then the linear projection and softmax over the vocabulary.

    Example:

    ```python
    >>> import torch
    >>> from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration
    >>> model = HfAttentionForConditionalGeneration(HfAttentionConfig.from_preset("tiny", vocab_size=100)).eval()
    >>> source = torch.tensor([[5, 6, 7, 2]])
    >>> loss = model(input_ids=source, labels=torch.tensor([[8, 9, 2]])).loss
    >>> generated = model.generate(source, num_beams=2, max_new_tokens=5)
    >>> generated.shape[0]
    1

    ```
    """

    def __init__(self, config: HfAttentionConfig):
        super().__init__(config)
        self.model = HfAttentionModel(config)
        self.lm_head = nn.Linear(config.d_model, config.target_vocab_size, bias=False)
        if config.add_final_logits_bias:
            # Differs from paper: Marian and BART add a fixed (untrained) bias to the logits.
            self.register_buffer("final_logits_bias", torch.zeros(1, config.target_vocab_size))
        # Differs from paper where configured: the paper shares one matrix between both embeddings and this
        # projection (§3.4); `share_encoder_decoder_embeddings` and `tie_word_embeddings` turn each share off.
        if config.share_encoder_decoder_embeddings:
            self._tied_weights_keys = {
                "lm_head.weight": "model.shared.weight",
                "model.encoder.embed_tokens.weight": "model.shared.weight",
                "model.decoder.embed_tokens.weight": "model.shared.weight",
            }
        else:
            self._tied_weights_keys = {"lm_head.weight": "model.decoder.embed_tokens.weight"}
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: tuple[torch.Tensor] | BaseModelOutput | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqLMOutput:
        """Next-token logits over the target vocabulary, and the cross-entropy loss when `labels` are given.

        Args:
            labels: target ids (B, T); -100 marks positions left out of the loss. Without `decoder_input_ids`
                they are shifted right to build them (teacher forcing).
            kwargs: `num_items_in_batch` (passed by `Trainer`) turns the loss into a sum divided by that count,
                so gradient accumulation and multi-process training average over all target tokens. The other
                arguments are `HfAttentionModel.forward`'s.

        Returns:
            `Seq2SeqLMOutput` with `logits` (B, T, V) and `loss`.

        Raises:
            ValueError: labels of the wrong rank or shape, or holding ids outside the vocabulary (other than -100).
        """
        if labels is not None:
            self._check_labels(labels, decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds)
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = shift_tokens_right(
                    labels, self.config.pad_token_id, self.config.decoder_start_token_id
                )
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=cache,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state)  # (B, T, V)
        if self.config.add_final_logits_bias:
            logits = logits + self.final_logits_bias

        loss = None
        if labels is not None:
            loss = label_smoothed_cross_entropy(logits, labels, num_items_in_batch=kwargs.get("num_items_in_batch"))

        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
        )

    def _check_labels(self, labels: torch.Tensor, decoder_inputs: torch.Tensor | None) -> None:
        if labels.dim() != 2:
            raise ValueError(f"`labels` must have shape (batch, target_length), got shape {tuple(labels.shape)}.")
        _check_not_empty("labels", labels.shape)
        if decoder_inputs is not None and tuple(labels.shape) != tuple(decoder_inputs.shape[:2]):
            raise ValueError(
                f"`labels` shape {tuple(labels.shape)} must match the decoder inputs' (batch, target_length) "
                f"{tuple(decoder_inputs.shape[:2])}."
            )
        if not is_torchdynamo_compiling():
            vocab_size = self.config.target_vocab_size
            valid = (labels == -100) | ((labels >= 0) & (labels < vocab_size))
            if not bool(valid.all()):
                raise ValueError(f"`labels` must hold -100 or ids in [0, {vocab_size}).")

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)


__all__ = [
    "HfAttentionPreTrainedModel",
    "HfAttentionModel",
    "HfAttentionForConditionalGeneration",
    "HfAttentionEncoder",
    "HfAttentionDecoder",
]


# Input checks: a wrong input fails with the argument's name and what was expected, not deep inside a layer.


def _check_token_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    """Fail with the argument's name instead of an index error deep inside an embedding lookup."""
    if ids.dim() != 2:
        raise ValueError(f"`{name}` must have shape (batch, length), got shape {tuple(ids.shape)}.")
    if ids.is_floating_point():
        raise ValueError(f"`{name}` must hold integer token ids, got dtype {ids.dtype}.")
    _check_not_empty(name, ids.shape)
    if ids.numel() and not is_torchdynamo_compiling():
        low, high = torch.aminmax(ids)
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"`{name}` holds ids in [{int(low)}, {int(high)}], outside the vocabulary [0, {vocab_size})."
            )


def _check_padding_mask(name: str, mask: torch.Tensor | None, batch_size: int, length: int, of: str) -> None:
    if mask is not None and mask.dim() == 2 and tuple(mask.shape) != (batch_size, length):
        raise ValueError(
            f"`{name}` must have shape (batch, length) = {(batch_size, length)} to match {of}, "
            f"got {tuple(mask.shape)}."
        )
    if mask is not None and mask.dim() not in (2, 4):
        raise ValueError(f"`{name}` must be 2-D (batch, length) or a 4-D mask, got shape {tuple(mask.shape)}.")


def _check_embeddings(name: str, embeds: torch.Tensor, d_model: int) -> None:
    if embeds.dim() != 3 or embeds.shape[-1] != d_model:
        raise ValueError(f"`{name}` must have shape (batch, length, d_model={d_model}), got {tuple(embeds.shape)}.")
    _check_not_empty(name, embeds.shape)


def _check_not_empty(name: str, shape: torch.Size) -> None:
    if 0 in shape[:2]:
        raise ValueError(
            f"`{name}` is empty (shape {tuple(shape)}): pass at least one sequence of at least one token."
        )
