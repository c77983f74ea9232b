"""Ensembles: several models that share a vocabulary decode as one, `EnsembleForConditionalGeneration([a, b])`.

At every decoding step each member scores the next token and the ensemble's log-probabilities are the members'
averaged (`combination="log_linear"`, as Marian and the issue trackers ask: the mean of the log-probabilities,
renormalised; or `"linear"`, fairseq's: the log of the mean probability), optionally weighted. The ensemble is a
`PreTrainedModel` with hf_attention's `generate()` (transformers' own, with §6.1's length limit and penalty, lexical
constraints, and the encoder output kept once per source), so greedy search, beam search, sampling, n-best lists,
target prefixes and constraints run over it unchanged; `hf_attention.score` scores given translations with it too.

How generation is fed: each member encodes the source once (its own `generate()` hooks: one encoder output per source,
not per hypothesis); the ensemble's `encoder_outputs` hold the members' outputs and source masks
(`EnsembleEncoderOutput`), and its cache holds one cache per member (`EnsembleCache`), reordered together by beam
search. Ensembles decode with growing (dynamic) caches: compiled static-cache steps are per model.
"""

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import Seq2SeqLMOutput

from ..configuration_hf_attention import HfAttentionConfig
from ..generation_hf_attention import HfAttentionGenerationMixin
from ..modeling_hf_attention import HfAttentionForConditionalGeneration

COMBINATIONS = ("log_linear", "linear")
# What the members must agree on to share one output vocabulary and one decoding loop.
SHARED_CONFIG_FIELDS = ("vocab_size", "pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id")


@dataclass
class EnsembleEncoderOutput:
    """Each member's encoder output and source mask (as its `generate()` prepared them), in member order. `get`
    answers as transformers' `BaseModelOutput` does for what the ensemble does not return (hidden states,
    attentions)."""

    member_outputs: tuple
    member_masks: tuple

    def get(self, name: str, default=None):
        return default


class EnsembleCache:
    """One key/value cache per member, reordered together by beam search."""

    is_compileable = False

    def __init__(self, member_caches: Sequence):
        self.member_caches = list(member_caches)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.member_caches[0].get_seq_length(layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for cache in self.member_caches:
            cache.reorder_cache(beam_idx)

    def __getattr__(self, name: str):
        """What the generation loop reads of a cache's layers (`is_linear`, `is_sliding`, ...): the first member's,
        as every member grows by the same tokens."""
        if name.startswith("__") or name == "member_caches":
            raise AttributeError(name)
        return getattr(self.member_caches[0], name)


def check_ensemble_members(models: Sequence[PreTrainedModel]) -> None:
    """Refuses members that cannot decode as one, naming the first difference.

    Raises:
        ValueError: no members, a member that is not an hf_attention model, or members whose vocabulary or special
            tokens differ.
    """
    if not models:
        raise ValueError("models: an ensemble needs at least one model.")
    for index, model in enumerate(models):
        if not isinstance(model, HfAttentionForConditionalGeneration):
            raise ValueError(f"models[{index}]: a {type(model).__name__}; ensembles combine hf_attention models "
                             "(HfAttentionForConditionalGeneration).")  # fmt: skip
    first = models[0].config
    for index, model in enumerate(models[1:], start=1):
        for name in SHARED_CONFIG_FIELDS:
            if getattr(model.config, name) != getattr(first, name):
                raise ValueError(f"models[{index}]: {name} {getattr(model.config, name)} differs from models[0]'s "
                                 f"{getattr(first, name)}; ensemble members must share one vocabulary.")  # fmt: skip


class EnsembleForConditionalGeneration(PreTrainedModel, HfAttentionGenerationMixin):
    """Models that share a vocabulary, decoding as one: see the module's docstring.

    Example:

    ```python
    >>> import torch
    >>> from hf_attention import EnsembleForConditionalGeneration, HfAttentionConfig
    >>> from hf_attention import HfAttentionForConditionalGeneration as Model
    >>> config = HfAttentionConfig.from_preset("tiny", vocab_size=100)
    >>> ensemble = EnsembleForConditionalGeneration([Model(config) for _ in range(2)])
    >>> ensemble.generate(torch.tensor([[5, 6, 7, 2]]), num_beams=2, max_new_tokens=3).shape[0]
    1

    ```
    """

    config_class = HfAttentionConfig
    main_input_name = "input_ids"
    _no_split_modules = ["EncoderLayer", "DecoderLayer"]
    _supports_sdpa = True  # the members' attention: they check their own implementation
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(
        self,
        models: Sequence[HfAttentionForConditionalGeneration],
        weights: Sequence[float] | None = None,
        combination: str = "log_linear",
    ):
        """
        Args:
            models: the members (hf_attention models sharing vocabulary and special tokens).
            weights: each member's weight in the average (default: equal); normalised to sum to 1.
            combination: "log_linear" (weighted mean of log-probabilities) or "linear" (log of the weighted mean
                probability).

        Raises:
            ValueError: members that cannot decode as one (`check_ensemble_members`), weights that are not one
                positive number per member, or an unknown combination.
        """
        check_ensemble_members(models)
        if combination not in COMBINATIONS:
            raise ValueError(f"combination {combination!r}: must be one of {', '.join(COMBINATIONS)}.")
        weights = [1.0] * len(models) if weights is None else [float(weight) for weight in weights]
        if len(weights) != len(models) or any(not weight > 0 for weight in weights):
            raise ValueError(f"weights {weights}: give one positive weight per model ({len(models)}).")
        super().__init__(copy.deepcopy(models[0].config))
        self.members = nn.ModuleList(models)
        self.weights = [weight / sum(weights) for weight in weights]
        self.combination = combination
        self.generation_config = copy.deepcopy(models[0].generation_config)
        self.post_init()

    def combine(self, member_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """The ensemble's log-probabilities (float32) from each member's logits (..., V)."""
        log_probs = torch.stack([logits.float().log_softmax(-1) for logits in member_logits])
        weights = torch.tensor(self.weights, device=log_probs.device).view(-1, *[1] * (log_probs.dim() - 1))
        if self.combination == "linear":
            return torch.logsumexp(log_probs + weights.log(), dim=0)
        return (log_probs * weights).sum(dim=0).log_softmax(-1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        encoder_outputs: EnsembleEncoderOutput | None = None,
        cache: EnsembleCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        """Every member's forward pass on the same inputs; `logits` are the combined log-probabilities (B, T, V), and
        `loss` (with `labels`) their cross-entropy."""
        member_logits, member_caches = [], []
        for index, member in enumerate(self.members):
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if encoder_outputs is not None:
                inputs = {"encoder_outputs": encoder_outputs.member_outputs[index],
                          "attention_mask": encoder_outputs.member_masks[index]}  # fmt: skip
            output = member(
                **inputs,
                decoder_input_ids=decoder_input_ids,
                labels=labels if decoder_input_ids is None else None,
                cache=cache.member_caches[index] if cache is not None else None,
                use_cache=use_cache,
                return_dict=True,
            )
            member_logits.append(output.logits)
            member_caches.append(output.cache)
        logits = self.combine(member_logits)
        loss = None
        if labels is not None:
            loss = nn.functional.nll_loss(logits.flatten(0, 1), labels.flatten().to(logits.device), ignore_index=-100)
        new_cache = EnsembleCache(member_caches) if all(c is not None for c in member_caches) else None
        return Seq2SeqLMOutput(loss=loss, logits=logits, cache=new_cache)

    # generate()'s hooks: the members prepare their own encoder outputs and caches.

    def _maybe_prepare_encoder_kwargs_for_generation(self, inputs_tensor, model_kwargs, model_input_name, config):
        if model_kwargs.get("encoder_outputs") is not None:
            return model_kwargs
        outputs, masks = [], []
        for member in self.members:
            prepared = member._maybe_prepare_encoder_kwargs_for_generation(
                inputs_tensor, dict(model_kwargs), model_input_name, config
            )
            outputs.append(prepared["encoder_outputs"])
            masks.append(prepared.get("attention_mask"))
        model_kwargs.pop("attention_mask", None)
        model_kwargs["encoder_outputs"] = EnsembleEncoderOutput(tuple(outputs), tuple(masks))
        return model_kwargs

    def _prepare_cache_for_generation(
        self, generation_config: GenerationConfig, model_kwargs: dict, generation_mode, batch_size, max_cache_length
    ) -> None:
        if model_kwargs.get("cache") is not None:
            raise ValueError("cache: an ensemble builds one cache per member; do not pass one.")
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(f"cache_implementation {generation_config.cache_implementation!r}: ensembles decode "
                             "with dynamic caches.")  # fmt: skip
        if generation_config.use_cache is False:
            return
        caches = []
        for member in self.members:
            prepared: dict = {}
            member._prepare_cache_for_generation(
                copy.copy(generation_config), prepared, generation_mode, batch_size, max_cache_length
            )
            caches.append(prepared["cache"])
        model_kwargs["cache"] = EnsembleCache(caches)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: EnsembleCache | None = None,
        encoder_outputs: EnsembleEncoderOutput | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> dict:
        if next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
        device = self.members[0].get_decoder().embed_tokens.weight.device
        return {
            "decoder_input_ids": input_ids.to(device).contiguous(),
            "cache": cache,
            "encoder_outputs": encoder_outputs,
            "use_cache": use_cache,
        }

    def _reorder_cache(self, cache: EnsembleCache, beam_idx: torch.LongTensor) -> EnsembleCache:
        for member, member_cache in zip(self.members, cache.member_caches, strict=True):
            member._reorder_cache(member_cache, beam_idx)
        return cache
