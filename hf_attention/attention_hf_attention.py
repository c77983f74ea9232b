"""Attention, §3.2 of "Attention Is All You Need": scaled dot-product attention (§3.2.1) and multi-head attention
(§3.2.2), serving as the encoder's self-attention, the decoder's masked self-attention and encoder-decoder attention
(§3.2.3). Split out of `modeling_hf_attention.py`, which imports it (it travels with a checkpoint as that file does).

Shape legend: B batch, S source length, T target length, K key length, D d_model, H heads, Dh = D/H.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from .configuration_hf_attention import HfAttentionConfig
from .dropout_hf_attention import apply_dropout


def padded(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The rows of a batch's tokens only, (tokens, F), spread out to its padded shape (B, T, F) where `tokens` (B, T)
    is True; zeros at the padding."""
    return rows.new_zeros(*tokens.shape, rows.shape[-1]).index_put_((tokens,), rows)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention, eq. 1: softmax(Q Kᵀ / √d_k) V.

    Args:
        query: (B, H, T, Dh).
        key, value: (B, H, K, Dh).
        attention_mask: additive mask broadcastable to (B, H, T, K): 0 where attended, dtype-min where masked.

    Returns:
        The attention output (B, T, H, Dh), heads not yet merged, and the weights (B, H, T, K).
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, K)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = apply_dropout(attn_weights, dropout, module.training)
    attn_output = torch.matmul(attn_weights, value)  # (B, H, T, Dh)
    attn_output = attn_output.transpose(1, 2).contiguous()  # (B, T, H, Dh)
    return attn_output, attn_weights


class MultiHeadAttention(nn.Module):
    """Multi-head attention, §3.2.2: h heads attend in parallel on projections of size d_k = d_model / h.

    Serves as encoder self-attention, masked decoder self-attention and encoder-decoder (cross) attention (§3.2.3).
    With a cache, decoder self-attention appends this step's keys/values; cross-attention projects the encoder
    output once per generation and reuses it on every later step.

    Cross-attention also takes k targets per source (B = k · sources, consecutive), as `generate` passes beam
    search's hypotheses: the k targets' queries attend to their source together, as k · T query positions, so the
    source's keys and values are neither copied nor read k times.
    """

    def __init__(
        self,
        config: HfAttentionConfig,
        num_heads: int,
        is_causal: bool = False,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.config = config
        self.embed_dim = config.d_model
        self.num_heads = num_heads
        self.head_dim = config.d_model // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_causal = is_causal
        self.layer_idx = layer_idx

        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)
        # Self-attention's three projections as one product, for fast decoding (`optimize_for_inference`).
        self.qkv_proj: nn.Module | None = None

    def project_source(
        self, encoder_hidden_states: torch.Tensor, attended: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention's keys and values of the encoder output (B, S, D), each (B, H, S, Dh). With `attended`
        (B, S, boolean), only those positions are projected and the others are zeros: the source padding, which the
        mask weighs 0 (`generate` on a CPU: a batch of 32 Multi30k sentences is half padding)."""
        shape = (*encoder_hidden_states.shape[:-1], -1, self.head_dim)
        if attended is None:
            projected = [self.k_proj(encoder_hidden_states), self.v_proj(encoder_hidden_states)]
        else:
            rows = encoder_hidden_states[attended]  # (tokens, D)
            projected = [padded(self.k_proj(rows), attended), padded(self.v_proj(rows), attended)]
        return tuple(states.reshape(shape).transpose(1, 2) for states in projected)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from `hidden_states` to itself, or to `key_value_states` for cross-attention.

        Args:
            hidden_states: queries' source, (B, T, D).
            key_value_states: encoder output (B, S, D) for cross-attention; None for self-attention.
            cache: the decoder's key/value cache (an `EncoderDecoderCache` while generating).
            attention_mask: mask from `transformers.masking_utils`, in the form the attention back-end expects.
            tokens: self-attention without a cache over the rows of a padded (B, T) batch's tokens only,
                `hidden_states` (tokens, D): where True (B, T), the positions those rows hold. Attention itself runs
                padded (the padding's keys zero and masked); the projections run on the tokens' rows.

        Returns:
            The attention output (B, T, D) (with `tokens`, (tokens, D)) and the weights (B, H, T, K), or None where
            the back-end gives none.
        """
        is_cross_attention = key_value_states is not None
        input_shape = hidden_states.shape[:-1] if tokens is None else tokens.shape
        if self.qkv_proj is not None and not is_cross_attention:
            query, key, value = self.qkv_proj(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = self.q_proj(hidden_states), None, None
        if tokens is not None:
            if is_cross_attention or cache is not None:
                raise ValueError("`tokens` is for self-attention without a cache (the encoder's).")
            key = self.k_proj(hidden_states) if key is None else key
            value = self.v_proj(hidden_states) if value is None else value
            query, key, value = (padded(states, tokens) for states in (query, key, value))
        query_states = query.view(*input_shape, -1, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

        layer_cache, cross_attention_is_cached = None, False
        if cache is not None:
            if isinstance(cache, EncoderDecoderCache):
                cross_attention_is_cached = is_cross_attention and cache.is_updated.get(self.layer_idx, False)
                layer_cache = cache.cross_attention_cache if is_cross_attention else cache.self_attention_cache
            else:
                layer_cache = cache

        if cross_attention_is_cached:
            # The encoder output does not change while decoding: reuse its projections (§3.2.3).
            key_states = layer_cache.layers[self.layer_idx].keys  # (B, H, S, Dh)
            value_states = layer_cache.layers[self.layer_idx].values
            attend_source = getattr(cache.self_attention_cache.layers[self.layer_idx], "attend_source", None)
            attn_output = attend_source and attend_source(
                query_states, key_states, value_states, attention_mask, self.scaling
            )
            if attn_output is not None:  # the step's attention by the cache layer's operation, as below
                return self.out_proj(attn_output.reshape(*input_shape, -1)), None
        else:
            if is_cross_attention:
                key_states, value_states = self.project_source(key_value_states)
            else:
                kv_shape = (*input_shape, -1, self.head_dim)
                key = self.k_proj(hidden_states) if key is None else key
                value = self.v_proj(hidden_states) if value is None else value
                key_states = key.reshape(kv_shape).transpose(1, 2)  # (B, H, T, Dh)
                value_states = value.reshape(kv_shape).transpose(1, 2)  # (B, H, T, Dh)
            if layer_cache is not None and not is_cross_attention:
                # A cache layer with its own step attention (generation_hf_attention.AncestralCacheLayer) stores
                # and attends in one call; it declines (None) where it cannot.
                layers = getattr(layer_cache, "layers", ())
                attend_step = (
                    getattr(layers[self.layer_idx], "attend_step", None) if len(layers) > self.layer_idx else None
                )
                attn_output = attend_step and attend_step(query_states, key_states, value_states, self.scaling)
                if attn_output is not None:
                    return self.out_proj(attn_output.reshape(*input_shape, -1)), None
            if layer_cache is not None:
                key_states, value_states = layer_cache.update(key_states, value_states, self.layer_idx)
                if is_cross_attention:
                    cache.is_updated[self.layer_idx] = True

        sources, targets_per_source = key_states.shape[0], input_shape[0] // key_states.shape[0]
        if targets_per_source > 1:  # (k·B', H, T, Dh) -> (B', H, k·T, Dh)
            query_states = query_states.unflatten(0, (sources, targets_per_source)).transpose(1, 2).flatten(2, 3)
            if attention_mask is not None and attention_mask.shape[-2] > 1:  # (B', 1|H, T, K): one row per query
                attention_mask = attention_mask.repeat(1, 1, targets_per_source, 1)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # Concat(head_1..head_h): (B, T, D)
        if tokens is not None:
            attn_output = attn_output[tokens]  # (tokens, D)
        if targets_per_source > 1 and attn_weights is not None:  # (B', H, k·T, K) -> (B, H, T, K)
            attn_weights = attn_weights.unflatten(2, (targets_per_source, -1)).transpose(1, 2).flatten(0, 1)
        attn_output = self.out_proj(attn_output)  # W^O
        return attn_output, attn_weights
