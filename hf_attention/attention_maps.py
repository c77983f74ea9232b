"""What attention "looks at": heatmaps of encoder self-, decoder self- and cross-attention for one sentence pair.

One PNG per attention kind and layer, a grid of heads, with the tokens on the axes (rows attend to columns), from
the weights `output_attentions=True` returns. The eager attention back-end is used for the pass, since fused kernels
(sdpa, flash) do not return weights.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# Output field -> (file prefix, title, side of the rows, side of the columns).
KINDS = {
    "encoder_attentions": ("encoder_self_attention", "encoder self-attention", "source", "source"),
    "decoder_attentions": ("decoder_self_attention", "decoder self-attention (masked)", "target", "target"),
    "cross_attentions": ("cross_attention", "encoder-decoder attention", "target", "source"),
}


@dataclass
class AttentionMaps:
    """Tokens on each side and, per kind, one (H, rows, columns) tensor per layer."""

    source_tokens: list[str]
    target_tokens: list[str]
    weights: dict[str, list[torch.Tensor]]


def attention_maps(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: str, target: str | None = None
) -> AttentionMaps:
    """Attention weights for one pair; without `target`, the model's own greedy translation is used.

    The decoder reads the target shifted right (its start token, then the target), as in training.
    """
    model.eval()
    encoded = tokenizer(source, return_tensors="pt").to(model.device)
    if target is None:
        with torch.no_grad():
            generated = model.generate(**encoded, num_beams=1, max_new_tokens=64)
        labels = generated[:, 1:]
    else:
        labels = tokenizer(text_target=target, return_tensors="pt")["input_ids"].to(model.device)
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels)
    previous_implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            output = model(**encoded, decoder_input_ids=decoder_input_ids, output_attentions=True)
    finally:
        model.set_attn_implementation(previous_implementation)
    weights = {kind: [layer[0].float().cpu() for layer in getattr(output, kind)] for kind in KINDS}
    return AttentionMaps(
        source_tokens=tokenizer.convert_ids_to_tokens(encoded["input_ids"][0].tolist()),
        target_tokens=tokenizer.convert_ids_to_tokens(decoder_input_ids[0].tolist()),
        weights=weights,
    )


def plot_attention_maps(maps: AttentionMaps, output_dir: str | Path, max_columns: int = 4) -> list[Path]:
    """Write e.g. `cross_attention_layer0.png` for every kind and layer: a grid of heads, tokens on both axes.

    Returns:
        The written paths, encoder self-attention first, then decoder self-attention, then cross-attention.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokens = {"source": maps.source_tokens, "target": maps.target_tokens}
    paths = []
    for kind, (prefix, title, row_side, column_side) in KINDS.items():
        for layer, layer_weights in enumerate(maps.weights[kind]):
            heads = layer_weights.shape[0]
            columns = min(heads, max_columns)
            rows = math.ceil(heads / columns)
            size = 1.0 + 0.28 * max(len(tokens[row_side]), len(tokens[column_side]))
            figure, axes = plt.subplots(rows, columns, figsize=(columns * size, rows * size), squeeze=False)
            for head, axis in enumerate(axes.flat):
                if head >= heads:
                    axis.axis("off")
                    continue
                axis.imshow(layer_weights[head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
                axis.set_title(f"head {head}", fontsize=9)
                axis.set_xticks(range(len(tokens[column_side])), tokens[column_side], rotation=90, fontsize=7)
                axis.set_yticks(range(len(tokens[row_side])), tokens[row_side], fontsize=7)
            figure.suptitle(f"{title}, layer {layer} (rows: {row_side} attending; columns: {column_side})")
            figure.tight_layout()
            path = output_dir / f"{prefix}_layer{layer}.png"
            figure.savefig(path, dpi=100)
            plt.close(figure)
            paths.append(path)
    return paths


@dataclass
class AttentionMapArguments:
    model_dir: str = field(metadata={"help": "A saved model folder (with its tokenizer) or a Hub repo id."})
    source: str = field(metadata={"help": "The source sentence."})
    target: str = field(default="", metadata={"help": "The target sentence; empty: the model's own translation."})
    output_dir: str = field(default="attention_maps", metadata={"help": "Where the PNG files go."})


def main(argv: list[str] | None = None) -> None:
    """`attention_maps.py --model_dir D --source "..." [--target "..."] [--output_dir O]`."""
    (args,) = HfArgumentParser(AttentionMapArguments).parse_args_into_dataclasses(args=argv)
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    maps = attention_maps(model, tokenizer, args.source, args.target or None)
    print(f"target: {tokenizer.convert_tokens_to_string(maps.target_tokens[1:])}")
    for path in plot_attention_maps(maps, args.output_dir):
        print(path)
