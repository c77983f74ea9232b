"""How hf_attention's `generate()` differs from transformers' own: the same search, with less memory traffic.

transformers' `generate()` works unchanged; these are the model's hooks into it (`GenerationMixin`'s private methods,
as RAG and others override them). Beam search of a batch of 16 sentences with 4 beams (Transformer-base, CPU, bf16)
spent most of its time moving the key/value cache, not computing:

- **The encoder output is not copied per hypothesis.** transformers repeats every source `num_beams` times; here each
  source is kept once and the decoder's cross-attention lets a source's hypotheses attend to it together, as extra
  query positions (`MultiHeadAttention`). The cross-attention cache is then a quarter of the size and is never
  reordered: reordering moves hypotheses only among the beams of one source, which share it.
- **The self-attention cache grows in place** (`GrowingCacheLayer`): a step writes its own position, where
  `DynamicLayer` concatenates and copies every earlier position, and a beam reorder gathers into a spare buffer in
  one pass. A CPU model set up by `optimize_for_inference` goes further (`AncestralCacheLayer`): a reorder moves
  only each hypothesis's list of ancestor rows, and our C++ operation attends through it, reading the cache once.
- **Each step's inputs are prepared in a few lines** (`prepare_inputs_for_generation`): transformers' general
  preparation takes 0.12 ms per token here (it reads the model's device and dtype by walking its parameters, and
  builds the static cache's mask, which the compiled decoder builds itself), a twentieth of a compiled int8 step of
  one sentence. Inputs it does not cover (a decoder mask, position ids, embeddings) go to transformers' own.
- **A padded batch is encoded without its padding** on a CPU (`_encode_without_padding`): the encoder's products
  cost per row there, so they run on the tokens' rows only, and so do the cross-attention's projections of the
  encoder output (`_project_source_without_padding`).
- Lexical constraints (`generate(constraints=[...])`) switch beam search to `constraints_hf_attention.py`'s
  constrained search, a `custom_generate` method.
- §6.1's length limit (input length + 50) is applied by `generate` itself, and so is §6.1's length penalty: with
  `length_penalty_style="gnmt"` (a generation config field, or a `generate()` argument) beam search divides a
  hypothesis's log-probability by GNMT's ((5 + |Y|) / 6)^α (Wu et al., 2016) in place of transformers' |Y|^α.

With a static cache (`cache_implementation="static"`), whose sizes are fixed in advance, the encoder output is
expanded as transformers does. `optimize_for_inference(compile=True)` asks for one so that greedy steps compile;
searches that transformers runs eagerly (beam search) keep the growing cache there. Otherwise the
`encoder_hidden_states` and `encoder_attentions` that `generate(return_dict_in_generate=True)` returns hold one row
per source, not per beam.
"""

import functools
from collections.abc import Callable

import torch
from transformers import CompileConfig, GenerationConfig, GenerationMixin
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.generation.configuration_utils import GenerationMode
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .constraints_hf_attention import constrained_beam_search

# The step inputs `prepare_inputs_for_generation` passes on as they are; any other goes to transformers' preparation.
PLAIN_STEP_INPUTS = frozenset({"encoder_outputs", "use_cache", "output_attentions", "output_hidden_states"})
# The searches whose step transformers compiles (`_sample`); the others call the model eagerly.
COMPILED_SEARCHES = frozenset({GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE})


class GrowingCacheLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers with room to grow.

    `update` writes the new positions in place and returns views of the filled part; `reorder_cache` gathers the
    rows into a spare buffer, which becomes the current one. When the states were replaced from outside (`crop`,
    `batch_select_indices`, offloading), the next `update` copies them into fresh buffers.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # (keys, values), (B, H, capacity, Dh)
        self._spare_buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _owns_states(self) -> bool:
        return self._buffers is not None and self.keys is self._key_view and self.values is self._value_view

    def _use_buffers(self, buffers: tuple[torch.Tensor, torch.Tensor], length: int) -> None:
        self._buffers = buffers
        self._key_view, self._value_view = buffers[0][:, :, :length], buffers[1][:, :, :length]
        self.keys, self.values = self._key_view, self._value_view

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past = self.get_seq_length()
        length = past + key_states.shape[-2]
        if not self._owns_states() or length > self._buffers[0].shape[-2]:
            capacity = max(length, 16, 2 * past)  # doubling: a cache of n positions is copied O(log n) times
            buffers = []
            for past_states, new_states in ((self.keys, key_states), (self.values, value_states)):
                buffer = new_states.new_empty(*new_states.shape[:2], capacity, new_states.shape[-1])
                if past:
                    buffer[:, :, :past] = past_states
                buffers.append(buffer)
            self._spare_buffers = None
            self._use_buffers(tuple(buffers), past)
        self._buffers[0][:, :, past:length] = key_states
        self._buffers[1][:, :, past:length] = value_states
        self._use_buffers(self._buffers, length)
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        length = self.get_seq_length()
        if length == 0:
            return
        if not self._owns_states():
            super().reorder_cache(beam_idx)
            return
        beam_idx = beam_idx.to(self.keys.device)
        if self._spare_buffers is None:
            self._spare_buffers = (torch.empty_like(self._buffers[0]), torch.empty_like(self._buffers[1]))
        for states, spare in zip((self.keys, self.values), self._spare_buffers, strict=True):
            torch.index_select(states, 0, beam_idx, out=spare[:, :, :length])
        self._buffers, self._spare_buffers = self._spare_buffers, self._buffers
        self._use_buffers(self._buffers, length)

    def reset(self) -> None:
        self._buffers = self._spare_buffers = None
        super().reset()


class AncestralCacheLayer(DynamicLayer):
    """A self-attention cache layer that beam search reorders without moving keys or values (CPU decoding with
    `optimize_for_inference`, which builds the operation it needs: `torch.ops.hf_attention.cached_attention`).

    Position j is stored once, by the hypothesis that computed it, in time-major buffers (capacity, B, H, Dh);
    `ancestors[b, j]` is the row holding position j of the hypothesis now in row b. A reorder gathers `ancestors`
    (B × length integers) where `GrowingCacheLayer` gathers the whole cache, and `attend_step` computes a step's
    attention reading each hypothesis's keys and values through it. Beam search of 16 sentences × 4 beams spent
    a sixth of its time in that gather (Transformer-base, int8, 2-core Zen 4).

    With `state_dtype=torch.bfloat16` the keys and values are stored in bf16, the cross-attention's included (a copy
    made on the first step): each decoding step reads every cached position of every layer once, and at 32
    sentences that traffic, not arithmetic, sets the operation's speed (Transformer-base int8, Zen 4: 32 sentences
    5% faster end to end). int8 models use it: their products already round activations more coarsely.

    Code that reads `keys` / `values` (transformers' cache utilities) gets them gathered, (B, H, length, Dh), in the
    dtype they came in; code that assigns them (`crop`, `batch_select_indices`, offloading) turns the layer into a
    plain `DynamicLayer`.
    """

    def __init__(self, attention: Callable, state_dtype: torch.dtype | None = None):
        self._attention = attention  # (query, keys, values, ancestors, length, scaling, bias) -> (B, H, Dh)
        self._state_dtype = state_dtype  # of the stored keys and values; None: as they come
        self._input_dtype: torch.dtype | None = None  # as they come (what `keys` / `values` give back)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # (capacity, B, H, Dh) each; None: plain
        self._ancestors: torch.Tensor | None = None  # (B, capacity) int64
        self._length = 0
        self._plain: list[torch.Tensor | None] = [None, None]
        self._source_rows: tuple | None = None  # attend_source's mask, keys, rows, bias, stored keys and values
        super().__init__()

    def _gathered(self, which: int) -> torch.Tensor:
        """Keys (0) or values (1) of every hypothesis, (B, H, length, Dh)."""
        positions = torch.arange(self._length, device=self._ancestors.device)
        states = self._buffers[which][positions, self._ancestors[:, : self._length]]  # (B, length, H, Dh)
        return states.transpose(1, 2).to(self._input_dtype)

    def _assign(self, which: int, states: torch.Tensor | None) -> None:
        if self._buffers is not None:  # replaced from outside: keep both as plain tensors from now on
            self._plain = [self._gathered(0), self._gathered(1)]
            self._buffers = self._ancestors = None
        self._plain[which] = states

    keys = property(lambda self: self._plain[0] if self._buffers is None else self._gathered(0),
                    lambda self, states: self._assign(0, states))  # fmt: skip
    values = property(lambda self: self._plain[1] if self._buffers is None else self._gathered(1),
                      lambda self, states: self._assign(1, states))  # fmt: skip

    def get_seq_length(self) -> int:
        return self._length if self._buffers is not None else super().get_seq_length()

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write positions length.. of each row (key_states, value_states: (B, H, T, Dh)), growing the buffers."""
        batch, heads, steps, head_dim = key_states.shape
        past, length = self._length, self._length + steps
        if self._buffers is None or length > self._buffers[0].shape[0]:
            capacity = max(length, 16, 2 * past)  # doubling: a cache of n positions is copied O(log n) times
            dtype = self._state_dtype or key_states.dtype
            buffers = tuple(key_states.new_empty(capacity, batch, heads, head_dim, dtype=dtype) for _ in range(2))
            ancestors = torch.empty(batch, capacity, dtype=torch.long, device=key_states.device)
            if self._buffers is not None:
                for buffer, old in zip(buffers, self._buffers, strict=True):
                    buffer[:past] = old[:past]
                ancestors[:, :past] = self._ancestors[:, :past]
            self._buffers, self._ancestors = buffers, ancestors
        self._buffers[0][past:length] = key_states.permute(2, 0, 1, 3)
        self._buffers[1][past:length] = value_states.permute(2, 0, 1, 3)
        self._ancestors[:, past:length] = torch.arange(batch, device=key_states.device)[:, None]
        self._length = length

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._buffers is None and self._plain[0].numel() > 0:  # made plain from outside
            return super().update(key_states, value_states)
        first = self._buffers is None
        self._input_dtype = key_states.dtype
        self._append(key_states, value_states)
        return (key_states, value_states) if first else (self._gathered(0), self._gathered(1))

    def attend_step(
        self, query: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor, scaling: float
    ) -> torch.Tensor | None:
        """Store one step's keys and values (B, H, 1, Dh) and attend from `query` (B, H, 1, Dh) to every position
        of each hypothesis, (B, 1, H, Dh); None (nothing stored) where this step is not for the operation."""
        if self._buffers is None or query.shape[2] != 1 or key_states.dtype != self._input_dtype:
            return None
        self._append(key_states, value_states)
        output = self._attention(query[:, :, 0], *self._buffers, self._ancestors, self._length, scaling)
        return output.unsqueeze(1)

    def attend_source(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scaling: float
    ) -> torch.Tensor | None:
        """The same layer's cross-attention for one step with the operation: `query` (B, H, 1, Dh) of k hypotheses
        per source, consecutive, to the cached `keys`/`values` (B/k, H, S, Dh) under the source padding `mask`
        ((B/k, 1, 1, S): boolean, True where attended, or additive); (B, 1, H, Dh), or None where not for it."""
        batch, sources, length = query.shape[0], keys.shape[0], keys.shape[2]
        if self._buffers is None or query.shape[2] != 1 or batch % sources or keys.dtype != query.dtype:
            return None
        if mask is not None and (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1):
            return None
        if (
            self._source_rows is None
            or self._source_rows[0] is not mask
            or self._source_rows[1] is not keys
            or self._source_rows[2].shape != (batch, length)
        ):
            rows = (torch.arange(batch, device=query.device) // (batch // sources))[:, None].expand(batch, length)
            bias = None if mask is None else mask[:, 0, 0]
            if bias is not None and bias.dtype == torch.bool:
                bias = torch.zeros(bias.shape, device=bias.device).masked_fill_(~bias, float("-inf"))
            stored = [states.permute(2, 0, 1, 3) for states in (keys, values)]  # (S, B/k, H, Dh)
            if self._state_dtype is not None and keys.dtype != self._state_dtype:
                stored = [states.to(self._state_dtype) for states in stored]
            self._source_rows = (mask, keys, rows, bias, *stored)  # the same for every step: kept for the next
        _, _, rows, bias, source_keys, source_values = self._source_rows
        output = self._attention(query[:, :, 0], source_keys, source_values, rows, length, scaling, bias)
        return output.unsqueeze(1)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self._buffers is None:
            super().reorder_cache(beam_idx)
            return
        filled = self._ancestors[:, : self._length]
        filled.copy_(filled.index_select(0, beam_idx.to(filled.device)))

    def reset(self) -> None:
        self._buffers = self._ancestors = self._source_rows = None
        self._length = 0
        super().reset()


class HfAttentionGenerationMixin(GenerationMixin):
    """transformers' `GenerationMixin` with hf_attention's hooks; see the module's docstring."""

    # True once `install_compiled_steps` ran: greedy search and sampling decode with a static cache in compiled steps,
    # and the searches transformers runs eagerly (beam search) keep the growing cache.
    static_cache_for_compiled_steps: bool = False
    compiled_steps_config: CompileConfig | None = None
    # True once `optimize_for_inference` built `torch.ops.hf_attention.cached_attention` for this CPU model: the
    # self-attention cache of `generate()` is then made of `AncestralCacheLayer`s.
    decode_with_cached_attention: bool = False
    # The dtype `AncestralCacheLayer`s store keys and values in (None: the model's); int8 models: bf16.
    cached_attention_state_dtype: torch.dtype | None = None

    def cached_attention_operation(self, generation_config: GenerationConfig, model_kwargs: dict) -> Callable | None:
        """The operation `AncestralCacheLayer`s attend with, where this `generate()` call can use them: a CPU model
        set up by `optimize_for_inference`, no attention weights asked for (the operation returns none), and no
        target padding mask (a decoding step then attends to every earlier position)."""
        if (
            not self.decode_with_cached_attention
            or self.device.type != "cpu"
            or generation_config.output_attentions
            or model_kwargs.get("decoder_attention_mask") is not None
        ):
            return None
        return getattr(torch.ops.hf_attention, "cached_attention", None)

    def install_compiled_steps(self, compile_config: CompileConfig, compiled_call: Callable | None = None) -> None:
        """Decode greedy search and sampling with a static cache in steps compiled as `compile_config` says
        (transformers compiles them on the first `generate()`). Each `generate()` call asks for them
        (`cache_implementation="static"`, `compile_config`); the generation config is left as it is, so that a
        saved model reloads to decode as an unoptimized one does (optimize it again after loading).
        `compiled_call`: the compiled `__call__` to use instead of transformers' own, set where transformers'
        `get_compiled_call` reads it (`_compiled_call`, reused while the compile config is `_last_compile_config`;
        tests/test_inference.py fails if that changes)."""
        self.compiled_steps_config = compile_config
        self.static_cache_for_compiled_steps = True
        if compiled_call is not None:
            self._compiled_call, self._last_compile_config = compiled_call, compile_config

    def _maybe_prepare_encoder_kwargs_for_generation(self, inputs_tensor, model_kwargs, model_input_name, config):
        """transformers' encoding step of `generate` (on a CPU, a padded batch's products on its tokens only:
        `_encode_without_padding`), then the source padding mask made into the decoder's cross-attention mask once:
        built from the 2-D mask at every step, it would read the mask back to the host each time (transformers
        checks whether it can skip it), a stall per generated token on a GPU."""
        if model_kwargs.get("encoder_outputs") is None:
            encoded = self._encode_without_padding(inputs_tensor, model_kwargs, model_input_name, config)
            if encoded is not None:
                model_kwargs["encoder_outputs"] = encoded
        model_kwargs = super()._maybe_prepare_encoder_kwargs_for_generation(
            inputs_tensor, model_kwargs, model_input_name, config
        )
        mask, encoded = model_kwargs.get("attention_mask"), model_kwargs.get("encoder_outputs")
        if mask is not None and mask.dim() == 2 and encoded is not None:
            hidden_states = encoded[0]
            model_kwargs["attention_mask"] = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=hidden_states[:, :1],  # one target position: every decoding step's query length
                attention_mask=mask,
                encoder_hidden_states=hidden_states,
            )
        return model_kwargs

    def _encode_without_padding(
        self, input_ids: torch.Tensor, model_kwargs: dict, model_input_name: str | None, config: GenerationConfig
    ) -> BaseModelOutput | None:
        """The encoder output of a padded batch on a CPU, its position-wise parts computed on the tokens' rows only
        (`HfAttentionEncoder(skip_padding=True)`); None where the batch has no padding or the call asks for the
        encoder's attentions or hidden states. A token's encoding does not depend on the padding, so this is the
        batch's own output at every token (the padding, which the decoder's cross-attention masks, holds zeros). On a
        CPU the encoder's products cost per row: a server's batch of 32 Multi30k sentences, 489 tokens padded to
        1,024 positions, is encoded in 37.6 ms, where length groups of 8 (608 rows) took 45.1 ms and the whole padded
        batch 84.5 ms (int8, Zen 4)."""
        mask = model_kwargs.get("attention_mask")
        if (
            input_ids.device.type != "cpu"
            or model_input_name not in (None, "input_ids")
            or input_ids.dim() != 2
            or not isinstance(mask, torch.Tensor)
            or mask.shape != input_ids.shape
            or config.output_attentions
            or config.output_hidden_states
            or mask.bool().all()
        ):
            return None
        return self.get_encoder()(input_ids=input_ids, attention_mask=mask, skip_padding=True)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """transformers' expansion to `expand_size` hypotheses per source, except the encoder output and the source
        mask: they stay one per source (the decoder attends from all of a source's hypotheses at once)."""
        kept = {name: model_kwargs.pop(name) for name in ("encoder_outputs", "attention_mask") if name in model_kwargs}
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, False, input_ids, **model_kwargs)
        model_kwargs.update(kept)
        return input_ids, model_kwargs

    def _prepare_cache_for_generation(
        self, generation_config: GenerationConfig, model_kwargs: dict, generation_mode, batch_size, max_cache_length
    ) -> None:
        """transformers' cache, with `GrowingCacheLayer`s for its dynamic self-attention layers; a cache of fixed
        sizes (static) gets the encoder output expanded to one copy per hypothesis, as transformers does.

        A model that `optimize_for_inference(compile=True)` set to a static cache for its compiled steps decodes
        the searches that run eagerly with the growing cache: beam search of 16 sentences (bf16, CPU) took 1.68 s
        with the static cache and 1.22 s with this one (on an H100, 0.36 s and 0.32 s)."""
        if (
            self.static_cache_for_compiled_steps
            and generation_config.cache_implementation == "static"
            and generation_mode not in COMPILED_SEARCHES
        ):
            generation_config.cache_implementation = None  # this call's copy of the configuration
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )
        cache = model_kwargs.get("cache")
        if not isinstance(cache, EncoderDecoderCache):
            return
        self_attention, cross_attention = cache.self_attention_cache, cache.cross_attention_cache
        if not getattr(cache, "_is_user_defined", False) and isinstance(self_attention, DynamicCache):
            operation = self.cached_attention_operation(generation_config, model_kwargs)
            new_layer = (
                GrowingCacheLayer
                if operation is None
                else functools.partial(AncestralCacheLayer, operation, self.cached_attention_state_dtype)
            )
            self_attention.layers = [
                new_layer() if type(layer) is DynamicLayer and not layer.is_initialized else layer
                for layer in self_attention.layers
            ]
        expand_size = max(generation_config.num_beams, generation_config.num_return_sequences)
        if not isinstance(cross_attention, DynamicCache) and expand_size > 1:
            self._expand_encoder_output(model_kwargs, expand_size)
        if isinstance(cross_attention, DynamicCache) and not getattr(cache, "_is_user_defined", False):
            self._project_source_without_padding(cache, model_kwargs)

    def _project_source_without_padding(self, cache: EncoderDecoderCache, model_kwargs: dict) -> None:
        """For a CPU model set up by `optimize_for_inference`, the cross-attention's keys and values of every decoder
        layer, projected from the source tokens only and cached before the first step (which would project the padding
        too). The products cost per row, and the tokens' rows are the same either way (the padding's are masked): 32
        Multi30k sentences, 489 tokens padded to 1,024, 14.0 -> 6.7 ms (int8, Zen 4). Done for every batch, padded or
        not, so that a sentence's first step reads its source's keys the same way alone and in a batch (a server's
        answers must not change). Other models are left to the first step: under FSDP, a decoder layer's weights are
        whole only inside its own forward (calling its projections from here failed: sharded weights)."""
        encoded, mask = model_kwargs.get("encoder_outputs"), model_kwargs.get("attention_mask")
        if (
            not self.decode_with_cached_attention
            or self.device.type != "cpu"
            or encoded is None
            or any(cache.is_updated.values())
        ):
            return
        hidden_states, attended = encoded[0], None
        if isinstance(mask, torch.Tensor):
            if mask.dim() != 4 or mask.shape[1:3] != (1, 1) or mask.shape[0] != hidden_states.shape[0]:
                return
            attended = mask[:, 0, 0] if mask.dtype == torch.bool else mask[:, 0, 0] == 0  # (B, S)
            if attended.shape != hidden_states.shape[:2]:
                return
            attended = None if attended.all() else attended
        elif mask is not None:
            return  # a mask of another kind (flex attention's): the first step projects as usual
        for layer in self.get_decoder().layers:
            attention = layer.encoder_attn
            cache.cross_attention_cache.update(*attention.project_source(hidden_states, attended), attention.layer_idx)
            cache.is_updated[attention.layer_idx] = True

    @staticmethod
    def _expand_encoder_output(model_kwargs: dict, expand_size: int) -> None:
        encoded = model_kwargs.get("encoder_outputs")
        if encoded is None:
            return
        for name, value in encoded.items():
            if isinstance(value, torch.Tensor):
                encoded[name] = value.repeat_interleave(expand_size, dim=0)
        if isinstance(model_kwargs.get("attention_mask"), torch.Tensor):
            model_kwargs["attention_mask"] = model_kwargs["attention_mask"].repeat_interleave(expand_size, dim=0)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: EncoderDecoderCache | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        """One decoding step's inputs: the new target tokens, the cache, the encoder output and its mask. What
        transformers' preparation does beyond that (decoder masks, position ids, embeddings) is left to it."""
        kwargs.pop("is_first_iteration", None)  # no inputs here differ between the first step and later ones
        if kwargs.keys() - PLAIN_STEP_INPUTS:
            return super().prepare_inputs_for_generation(
                input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
                **kwargs,
            )  # fmt: skip
        if next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
        device = self.get_decoder().embed_tokens.weight.device
        # Contiguous: a slice's strides change with the sequence length, and would recompile a compiled step.
        decoder_input_ids = input_ids.to(device).clone(memory_format=torch.contiguous_format)
        model_inputs = {"decoder_input_ids": decoder_input_ids, "cache": cache, **kwargs}
        if attention_mask is not None:
            model_inputs["attention_mask"] = attention_mask.to(device)
        return model_inputs

    def _reorder_cache(self, cache: EncoderDecoderCache, beam_idx: torch.LongTensor) -> EncoderDecoderCache:
        """Beam search's reordering, of the self-attention cache only: hypotheses move only among the beams of one
        source, and those share their cross-attention keys and values."""
        if isinstance(cache, EncoderDecoderCache):
            cache.self_attention_cache.reorder_cache(beam_idx)
        else:
            cache.reorder_cache(beam_idx)
        return cache

    def generate(
        self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs
    ):
        """transformers' `generate`, plus §6.1's length limit (`with_source_length_limit`) and length penalty
        (`with_length_penalty_style`), and lexical constraints (`constraints=[...]`, one `LexicalConstraints` per
        source: `constraints_hf_attention.py`)."""
        config = generation_config or self.generation_config
        kwargs = with_constrained_search(
            with_length_penalty_style(config, with_source_length_limit(config, inputs, kwargs))
        )
        if (
            self.static_cache_for_compiled_steps and "constraints" not in kwargs
        ):  # this call's settings, not the saved generation config's
            kwargs.setdefault("cache_implementation", "static")
            kwargs.setdefault("compile_config", self.compiled_steps_config)
        return super().generate(inputs, generation_config=generation_config, **kwargs)


def with_constrained_search(kwargs: dict) -> dict:
    """`generate()`'s keyword arguments, with constrained beam search as the decoding method when `constraints` are
    given (transformers 5 dropped its own; ours is a `custom_generate` method)."""
    if kwargs.get("constraints") is None:
        kwargs.pop("constraints", None)
        return kwargs
    return {"custom_generate": constrained_beam_search, **kwargs}


LENGTH_PENALTY_STYLES = ("transformers", "gnmt")


class GnmtLengthPenalty(float):
    """GNMT's length penalty α (Wu et al., 2016), which the paper's §6.1 uses (α = 0.6): lp(Y) = ((5 + |Y|) / 6)^α.

    transformers' beam search divides a hypothesis's log-probability by `length ** length_penalty`, with `length` a
    Python int; this float is α, and raising a length to it gives ((5 + length) / 6)^α. The private arithmetic this
    relies on is pinned by `test_generation.py::test_gnmt_length_penalty_scores_hypotheses_by_wu_et_al_s_formula`,
    which fails if transformers applies the penalty another way.
    """

    def __rpow__(self, length):
        if isinstance(length, int):
            return ((5 + length) / 6) ** float(self)
        return NotImplemented  # a tensor or float length: transformers changed its arithmetic (see the test)

    def __repr__(self) -> str:
        return f"GnmtLengthPenalty({float(self)})"


def with_length_penalty_style(generation_config: GenerationConfig, kwargs: dict) -> dict:
    """`generate()`'s keyword arguments with the length penalty of `length_penalty_style` (a keyword argument, else
    the generation config's field; default "transformers": |Y|^α).

    Raises:
        ValueError: a style other than "transformers" or "gnmt".
    """
    style = kwargs.pop("length_penalty_style", None) or getattr(generation_config, "length_penalty_style", None)
    if style in (None, "transformers"):
        return kwargs
    if style != "gnmt":
        raise ValueError(f"length_penalty_style {style!r}: must be one of {', '.join(LENGTH_PENALTY_STYLES)}.")
    alpha = kwargs.get("length_penalty", generation_config.length_penalty)
    return {**kwargs, "length_penalty": GnmtLengthPenalty(1.0 if alpha is None else alpha)}


def with_source_length_limit(generation_config: GenerationConfig, inputs: torch.Tensor | None, kwargs: dict) -> dict:
    """`generate()`'s keyword arguments with §6.1's length limit: "maximum output length ... input length + 50".

    A generation config with `max_new_tokens_over_source = k` (the training job saves k = 50) stops a batch at its
    longest source + k new tokens, within `max_new_tokens` if that is set too, unless the call passes
    `max_new_tokens` or `max_length` itself.
    """
    over_source = getattr(generation_config, "max_new_tokens_over_source", None)
    source = inputs if inputs is not None else kwargs.get("input_ids")
    if over_source is None or source is None or {"max_new_tokens", "max_length"} & kwargs.keys():
        return kwargs
    limit = source.shape[-1] + over_source
    configured = generation_config.max_new_tokens
    return {**kwargs, "max_new_tokens": min(limit, configured) if configured else limit}
