"""Render attention heatmaps (encoder, decoder, cross; per layer, heads in a grid) for one sentence (see --help)."""

from dataclasses import dataclass, field

from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, HfArgumentParser

from hf_attention.attention_maps import attention_maps, plot_attention_maps


@dataclass
class AttentionMapArguments:
    model_dir: str = field(metadata={"help": "A saved model folder (with its tokenizer) or a Hub repo id."})
    source: str = field(metadata={"help": "The source sentence."})
    target: str = field(default="", metadata={"help": "The target sentence; empty: the model's own translation."})
    output_dir: str = field(default="attention_maps", metadata={"help": "Where the PNG files go."})


def main() -> None:
    (args,) = HfArgumentParser(AttentionMapArguments).parse_args_into_dataclasses()
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    maps = attention_maps(model, tokenizer, args.source, args.target or None)
    print(f"target: {tokenizer.convert_tokens_to_string(maps.target_tokens[1:])}")
    for path in plot_attention_maps(maps, args.output_dir):
        print(path)


if __name__ == "__main__":
    main()
