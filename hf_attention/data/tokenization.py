"""A joint source/target subword tokenizer (BPE or Unigram) trained with `tokenizers`, as `PreTrainedTokenizerFast`."""

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_tokenizer_source(flag: str, name: str) -> None:
    """Fail with the flag named when `name` is a missing local folder or a folder without a tokenizer.

    transformers would answer "Repo id must be in the form ..." or "You need to have sentencepiece installed".
    Names that are not local paths (Hub ids) are left to `from_pretrained`.
    """
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not path.is_dir():
        raise ValueError(f"{flag} {name}: no such folder.")
    if path.is_dir() and not any((path / file).is_file() for file in TOKENIZER_FILES):
        raise ValueError(
            f"{flag} {name}: the folder holds no tokenizer ({' or '.join(TOKENIZER_FILES)}); save the tokenizer "
            "beside the model, or name a tokenizer folder."
        )


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2, model: str = "bpe"
) -> PreTrainedTokenizerFast:
    """Train one subword vocabulary over both languages (§5.1: "a shared source-target vocabulary").

    Args:
        texts: source and target sentences.
        vocab_size: at most this many subwords (the paper: ~37000 BPE for En-De); specials included.
        model: `"bpe"` (the paper's byte-pair encoding) or `"unigram"` (SentencePiece's default, as in Marian).

    Ids 0-3 are <pad>, <s>, </s>, <unk>, matching `HfAttentionConfig`'s defaults. Every encoded sequence ends with
    </s>, as Marian's tokenizers do, so generation learns where to stop.
    """
    specials = list(SPECIAL_TOKENS.values())
    if model == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials)
    elif model == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token=SPECIAL_TOKENS["unk_token"]
        )
    else:
        raise ValueError(f"Unknown tokenizer model {model!r}; choose 'bpe' or 'unigram'.")
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(texts, trainer=trainer)
    eos = SPECIAL_TOKENS["eos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tokenizer.token_to_id(eos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=512, **SPECIAL_TOKENS)
