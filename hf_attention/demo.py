"""The main job on the embedded default: train a small Transformer on the toy corpus, save, reload, translate."""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    Seq2SeqTrainer,
    set_seed,
)

from .configuration_hf_attention import HfAttentionConfig
from .data import tokenize_pairs, toy_translation_dataset
from .modeling_hf_attention import HfAttentionForConditionalGeneration
from .tokenization import train_tokenizer
from .training import paper_training_arguments


@dataclass
class DemoArguments:
    output_dir: str = field(default="runs/demo", metadata={"help": "Where the trained model and tokenizer go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace what output_dir already holds."})
    preset: str = field(default="tiny", metadata={"help": "Model size: tiny, base or big."})
    train_size: int = field(default=20000, metadata={"help": "Toy sentence pairs to train on."})
    test_size: int = field(default=200, metadata={"help": "Held-out toy sentence pairs to translate."})
    vocab_size: int = field(default=400, metadata={"help": "Subword vocabulary size."})
    max_steps: int = field(default=1000, metadata={"help": "Optimiser steps."})
    batch_size: int = field(default=64, metadata={"help": "Sentence pairs per step."})
    warmup_steps: int = field(default=150, metadata={"help": "Warm-up steps of the eq. 3 schedule."})
    learning_rate_scale: float = field(default=2.0, metadata={"help": "Multiplies eq. 3's learning rate."})
    num_beams: int = field(default=4, metadata={"help": "Beam size when translating."})
    seed: int = 0


def exact_match(model, tokenizer, sources: list[str], references: list[str], num_beams: int) -> tuple[float, list]:
    """Share of sources translated exactly like the reference, and the translations."""
    batch = tokenizer(sources, return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = model.generate(**batch, num_beams=num_beams, max_new_tokens=64)
    translations = tokenizer.batch_decode(generated, skip_special_tokens=True)
    matches = sum(t.strip() == r for t, r in zip(translations, references, strict=True))
    return matches / len(references), translations


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite_output_dir:
        sys.exit(f"error: {output_dir} is not empty; pass --overwrite_output_dir to replace it.")
    set_seed(args.seed)
    started = time.perf_counter()

    train = toy_translation_dataset(args.train_size, seed=args.seed)
    test = toy_translation_dataset(args.test_size, seed=args.seed + 1)
    texts = [pair[lang] for pair in train["translation"] for lang in ("en", "de")]
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab_size)
    print(f"tokenizer: {len(tokenizer)} subwords; example: {tokenizer.tokenize(train[0]['translation']['de'])}")

    config = HfAttentionConfig.from_preset(args.preset, vocab_size=len(tokenizer))
    model = HfAttentionForConditionalGeneration(config)
    print(f"model: {args.preset} preset, {model.num_parameters() / 1e6:.2f}M parameters")

    sources = [pair["en"] for pair in test["translation"]]
    references = [pair["de"] for pair in test["translation"]]
    before, _ = exact_match(model.eval(), tokenizer, sources[:50], references[:50], args.num_beams)

    training_args = paper_training_arguments(
        str(output_dir / "checkpoints"),
        d_model=config.d_model,
        warmup_steps=args.warmup_steps,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        seed=args.seed,
        disable_tqdm=False,
    )
    training_args.learning_rate *= args.learning_rate_scale
    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenize_pairs(train, tokenizer, "en", "de", max_length=64),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(str(output_dir))

    reloaded = AutoModelForSeq2SeqLM.from_pretrained(output_dir).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(output_dir)
    after, translations = exact_match(reloaded, reloaded_tokenizer, sources, references, args.num_beams)
    for source, translation, reference in list(zip(sources, translations, references, strict=True))[:5]:
        print(f"\n  en:        {source}\n  model:     {translation}\n  reference: {reference}")
    print(
        f"\nexact-match on {len(sources)} held-out sentences: {after:.1%} (untrained model: {before:.1%}); "
        f"saved to {output_dir}; {time.perf_counter() - started:.0f}s in all"
    )


if __name__ == "__main__":
    main()
