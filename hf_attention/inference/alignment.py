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
    targets: Sequence[str] | Sequence[Sequence[int]],
    layer: int | None = None,
    head: int | None = None,
    batch_size: int = 32,
) -> list[Alignment]:
    """Word alignments of each (source, target) pair, sorted by target word then source word.

    Args:
        model: an hf_attention model (or any transformers encoder-decoder that returns `cross_attentions`).
        tokenizer: its tokenizer (a fast tokenizer: word ids come from it).
        sources, targets: the pairs; targets are text (tokenized with `text_target`), or token ids such as
            `generate()`'s (without the decoder start token), which are aligned as generated.
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
    if targets and isinstance(targets[0], str):
        encoded = tokenizer(text_target=list(targets), truncation=True)
        target_ids = encoded["input_ids"]
        target_words = [encoded.word_ids(row) for row in range(len(targets))]
    else:
        target_ids = [list(map(int, ids)) for ids in targets]
        target_words = [target_word_ids(tokenizer, ids) for ids in target_ids]
    found: list[Alignment] = [[] for _ in sources]
    previous_implementation = model.config._attn_implementation
    was_training = model.training
    model.eval()
    model.set_attn_implementation("eager")  # fused kernels (sdpa, flash) return no weights
    try:
        lengths = [len(ids) for ids in target_ids]
        for batch in cut_into_batches(lengths, None, max_rows=batch_size, longest_first=True):
            attention = _cross_attention(model, tokenizer, [sources[i] for i in batch], [target_ids[i] for i in batch],
                                         layer, head)  # fmt: skip
            encoded = tokenizer([sources[i] for i in batch], padding=True, truncation=True)
            for row, index in enumerate(batch):
                found[index] = links_from_attention(
                    attention[row],
                    encoded["input_ids"][row],
                    encoded.word_ids(row),
                    target_ids[index],
                    target_words[index],
                    set(tokenizer.all_special_ids),
                )
    finally:
        model.set_attn_implementation(previous_implementation)
        model.train(was_training)
    return found


def _cross_attention(model, tokenizer, sources: list[str], target_ids: list[list[int]], layer: int,
                     head: int | None) -> torch.Tensor:  # fmt: skip
    """Layer `layer`'s cross-attention (heads averaged, or one head) under teacher forcing: (B, T, S)."""
    encoded = tokenizer(sources, padding=True, truncation=True, return_tensors="pt")
    longest = max(map(len, target_ids))
    labels = torch.full((len(target_ids), longest), -100, dtype=torch.long)
    for row, ids in enumerate(target_ids):
        labels[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    with torch.inference_mode():
        output = model(**encoded.to(model.device), labels=labels.to(model.device), output_attentions=True)
    attention = output.cross_attentions[layer].float()  # (B, H, T, S)
    return (attention.mean(dim=1) if head is None else attention[:, head]).cpu()


def links_from_attention(attention, source_ids: list[int], source_words: list[int | None], target_ids: list[int],
                         target_words: list[int | None], special: set[int]) -> Alignment:  # fmt: skip
    """The argmax rule: each target token's most attended source token (rows: target tokens, columns: source tokens;
    special tokens and padding left out), as word links sorted by target word. CTranslate2's attention goes through
    it too (`CTranslate2Engine`)."""
    usable = [s for s, word in enumerate(source_words) if word is not None and source_ids[s] not in special]
    pairs = set()
    for t, (token, word) in enumerate(zip(target_ids, target_words, strict=True)):
        if word is None or token in special or t >= len(attention) or not usable:
            continue
        row = attention[t]
        s = max(usable, key=lambda column: float(row[column]))
        pairs.add((source_words[s], word))
    return sorted(pairs, key=lambda pair: (pair[1], pair[0]))


def target_word_ids(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[int | None]:
    """Each of `ids`' word (None for special tokens): the tokenizer's own word ids when tokenizing the decoded text
    gives these tokens back, else SentencePiece's rule ("▁" starts a word)."""
    special = set(tokenizer.all_special_ids)
    text = tokenizer.decode(list(ids), skip_special_tokens=True).strip()
    encoded = tokenizer(text_target=[text])
    again = encoded["input_ids"][0]
    if [i for i in again if i not in special] == [i for i in ids if i not in special]:
        words = iter(word for token, word in zip(again, encoded.word_ids(0), strict=True) if token not in special)
        return [None if token in special else next(words) for token in ids]
    words, word = [], -1
    for token, piece in zip(ids, tokenizer.convert_ids_to_tokens(list(ids)), strict=True):
        if token in special:
            words.append(None)
            continue
        if piece.startswith("▁") or word < 0:
            word += 1
        words.append(word)
    return words


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
