"""Word alignments from cross-attention: which source word each target word was translated from, as Moses `i-j`
pairs (source word i, target word j, counted from 0 over whitespace-separated words), `translate.py --alignments`.

The rule is the usual one (fairseq's `--print-alignment`, Marian's `--alignment hard`): run the pair under teacher
forcing, take one decoder layer's cross-attention (its heads averaged, or one head: the head a guided-alignment
model was trained on), and link each target token to the source token it attends to most, the end token and padding
excluded on both sides; the decoder row that predicts a token aligns that token. Subword links become word links
through the tokenizer's word ids (`BatchEncoding.word_ids`), each pair of words once. The default layer is the
penultimate, whose attention aligns best in Garg et al. (2019)'s measurements.
"""

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.batching import cut_into_batches

Alignment = list[tuple[int, int]]


def default_alignment_layer(model: PreTrainedModel) -> int:
    """The decoder layer whose cross-attention aligns: the penultimate (the only one of a one-layer decoder)."""
    return max(model.config.decoder_layers - 2, 0)


def check_alignment_layer(model: PreTrainedModel, layer: int | None, head: int | None = None) -> int:
    """`layer` (default: the layer guided-alignment training taught, else `default_alignment_layer`), checked
    against the model.

    Raises:
        ValueError: a layer or head the model does not have.
    """
    layers, heads = model.config.decoder_layers, model.config.decoder_attention_heads
    if layer is not None and not -layers <= layer < layers:
        raise ValueError(f"alignment_layer {layer}: the decoder has layers 0 to {layers - 1}.")
    if head is not None and not 0 <= head < heads:
        raise ValueError(f"alignment_head {head}: the cross-attention has heads 0 to {heads - 1}.")
    if layer is None:
        taught = getattr(getattr(model, "generation_config", None), "alignment_layer", None)
        return default_alignment_layer(model) if taught is None else taught
    return layer % layers


def format_alignment(pairs: Alignment) -> str:
    """Moses' layout: `0-0 1-2 2-1`."""
    return " ".join(f"{source}-{target}" for source, target in pairs)


def align(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[str],
    targets: Sequence[str],
    layer: int | None = None,
    head: int | None = None,
    batch_size: int = 32,
) -> list[Alignment]:
    """Word alignments of each (source, target) pair, sorted by target word then source word.

    Args:
        model: an hf_attention model (or any transformers encoder-decoder that returns `cross_attentions`).
        tokenizer: its tokenizer (a fast tokenizer: word ids come from it).
        sources, targets: the pairs; targets are text, for example the model's translations.
        layer: the decoder layer; head: one head, or None to average them. Both default to what
            guided-alignment training taught (`alignment_layer`, `alignment_head` in the generation config), else
            to the penultimate layer's heads averaged.

    Raises:
        ValueError: pairs of different counts, a layer or head the model does not have, or a slow tokenizer.
    """
    if len(sources) != len(targets):
        raise ValueError(f"targets: {len(targets)} targets for {len(sources)} sources; give one per source.")
    if not tokenizer.is_fast:
        raise ValueError("tokenizer: alignments need a fast tokenizer (its word ids map subwords to words).")
    if layer is None and head is None:
        head = getattr(getattr(model, "generation_config", None), "alignment_head", None)
    layer = check_alignment_layer(model, layer, head)
    found: list[Alignment] = [[] for _ in sources]
    lengths = [len(target) for target in targets]
    previous_implementation = model.config._attn_implementation
    was_training = model.training
    model.eval()
    model.set_attn_implementation("eager")  # fused kernels (sdpa, flash) return no weights
    try:
        for batch in cut_into_batches(lengths, None, max_rows=batch_size, longest_first=True):
            found_in_batch = _align_batch(model, tokenizer, [sources[i] for i in batch], [targets[i] for i in batch],
                                          layer, head)  # fmt: skip
            for index, pairs in zip(batch, found_in_batch, strict=True):
                found[index] = pairs
    finally:
        model.set_attn_implementation(previous_implementation)
        model.train(was_training)
    return found


def _align_batch(model, tokenizer, sources: list[str], targets: list[str], layer: int, head: int | None):
    encoded = tokenizer(sources, padding=True, truncation=True, return_tensors="pt")
    labeled = tokenizer(text_target=targets, padding=True, truncation=True, return_tensors="pt")
    labels = labeled["input_ids"].masked_fill(labeled["attention_mask"] == 0, -100)
    with torch.inference_mode():
        output = model(**encoded.to(model.device), labels=labels.to(model.device), output_attentions=True)
    attention = output.cross_attentions[layer].float()  # (B, H, T, S)
    attention = attention.mean(dim=1) if head is None else attention[:, head]
    special = set(tokenizer.all_special_ids)
    alignments = []
    for row in range(len(sources)):
        source_words, target_words = encoded.word_ids(row), labeled.word_ids(row)
        source_ids, target_ids = encoded["input_ids"][row].tolist(), labeled["input_ids"][row].tolist()
        usable = [s for s, word in enumerate(source_words) if word is not None and source_ids[s] not in special]
        pairs = set()
        if usable:
            for t, target_word in enumerate(target_words):
                if target_word is None or target_ids[t] in special:
                    continue
                s = usable[int(attention[row, t, usable].argmax())]
                pairs.add((source_words[s], target_word))
        alignments.append(sorted(pairs, key=lambda pair: (pair[1], pair[0])))
    return alignments


def alignment_error_rate(found: Sequence[Alignment], sure: Sequence[Alignment],
                         possible: Sequence[Alignment] | None = None) -> float:  # fmt: skip
    """AER (Och & Ney, 2003) of `found` against hand alignments: 1 - (|A∩S| + |A∩P|) / (|A| + |S|), where the
    possible links P include the sure ones S (default: P = S)."""
    possible = sure if possible is None else possible
    a_and_s = a_and_p = a_count = s_count = 0
    for links, sure_links, possible_links in zip(found, sure, possible, strict=True):
        links, sure_links = set(links), set(sure_links)
        possible_links = set(possible_links) | sure_links
        a_and_s += len(links & sure_links)
        a_and_p += len(links & possible_links)
        a_count += len(links)
        s_count += len(sure_links)
    if a_count + s_count == 0:
        return 0.0
    return 1.0 - (a_and_s + a_and_p) / (a_count + s_count)
