"""The joint BPE tokenizer: special ids match the config, round trip through save and AutoTokenizer."""

import pytest
from transformers import AutoTokenizer

from hf_attention import HfAttentionConfig
from hf_attention.data import toy_translation_corpus
from hf_attention.data.tokenization import train_tokenizer


def test_special_token_ids_match_the_config_defaults():
    texts = [p["translation"][lang] for p in toy_translation_corpus(200) for lang in ("en", "de")]
    tokenizer = train_tokenizer(texts, vocab_size=150)
    config = HfAttentionConfig()
    assert tokenizer.pad_token_id == config.pad_token_id
    assert tokenizer.bos_token_id == config.bos_token_id
    assert tokenizer.eos_token_id == config.eos_token_id
    assert tokenizer.unk_token_id == 3


def test_save_reload_and_decode_round_trip(tmp_path):
    texts = [p["translation"][lang] for p in toy_translation_corpus(200) for lang in ("en", "de")]
    train_tokenizer(texts, vocab_size=150).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    sentence = "wir kaufen vier hundert ein und zwanzig hunde"
    ids = tokenizer(sentence)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == sentence


@pytest.mark.parametrize("model", ["bpe", "unigram"])
def test_both_subword_models_respect_the_vocabulary_size_and_round_trip(model, tmp_path):
    texts = [p["translation"][lang] for p in toy_translation_corpus(300) for lang in ("en", "de")]
    tokenizer = train_tokenizer(texts, vocab_size=120, model=model)
    assert len(tokenizer) <= 120 and tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    sentence = "sie malen drei tausend bäume"
    assert reloaded.decode(reloaded(sentence)["input_ids"], skip_special_tokens=True) == sentence


def test_unknown_subword_model_is_named():
    with pytest.raises(ValueError, match="Unknown tokenizer model 'wordpiece'"):
        train_tokenizer(["a b"], model="wordpiece")
