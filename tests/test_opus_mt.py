"""The opus-mt hand-off end to end: an opus-mt-layout Marian model with its real MarianTokenizer is converted,
fine-tuned with the training job, published to the loopback Hub, and pulled where hf_attention is not installed."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, MarianConfig, MarianMTModel, MarianTokenizer

from hf_attention.data import toy_translation_corpus
from hf_attention.hub.marian_conversion import convert_checkpoint
from hf_attention.training.job import main as train

from .helpers import hub_environment, require_module
from .hub_server import LocalHub
from .test_hub_roundtrip import client

sentencepiece = require_module("sentencepiece")

ROOT = Path(__file__).parent.parent
SENTENCES = ["we buy two dogs", "they sell ninety one trees"]


def opus_mt_checkpoint(folder: Path, separate_vocabs: bool = False) -> None:
    """What an opus-mt repo holds: source.spm, target.spm, a joint vocab.json with </s> 0 and <pad> last, a
    tokenizer_config.json without tokenizer_class, and a MarianMTModel whose decoding starts from <pad>.

    With `separate_vocabs`, as some opus-mt pairs have: vocab.json for the source and target_vocab.json for the
    target, of other sizes, each with <pad> at id 2, and separate embeddings."""
    folder.mkdir()
    corpus = toy_translation_corpus(300)
    vocab = {"</s>": 0, "<unk>": 1}
    vocabs = {}
    for side, lang in (("source", "en"), ("target", "de")):
        if separate_vocabs:
            vocab = vocabs[side] = {"</s>": 0, "<unk>": 1, "<pad>": 2}
        text = folder.parent / f"{lang}.txt"
        text.write_text("\n".join(pair["translation"][lang] for pair in corpus) + "\n")
        sentencepiece.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(folder / side), model_type="unigram",
            vocab_size=50 + 8 * (separate_vocabs and side == "target"), bos_id=-1, eos_id=2, unk_id=1, pad_id=-1,
            minloglevel=2,
        )  # fmt: skip
        (folder / f"{side}.model").rename(folder / f"{side}.spm")
        (folder / f"{side}.vocab").unlink()
        processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / f"{side}.spm"))
        for piece in (processor.id_to_piece(i) for i in range(processor.get_piece_size())):
            vocab.setdefault(piece, len(vocab))
    vocab.setdefault("<pad>", len(vocab))
    source_vocab = vocabs.get("source", vocab)
    (folder / "vocab.json").write_text(json.dumps(source_vocab))
    files = [str(folder / name) for name in ("source.spm", "target.spm", "vocab.json")]
    if separate_vocabs:
        (folder / "target_vocab.json").write_text(json.dumps(vocabs["target"]))
        files.append(str(folder / "target_vocab.json"))
    tokenizer = MarianTokenizer(*files, source_lang="en", target_lang="de", separate_vocabs=separate_vocabs)
    tokenizer.save_pretrained(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("tokenizer_class", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=len(source_vocab), decoder_vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=128, share_encoder_decoder_embeddings=not separate_vocabs,
        pad_token_id=source_vocab["<pad>"], decoder_start_token_id=vocab["<pad>"], eos_token_id=0,
        forced_eos_token_id=0,
    )  # fmt: skip
    MarianMTModel(config).save_pretrained(folder)


def translations(model, tokenizer) -> list[str]:
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = model.eval().generate(**batch, num_beams=2, max_new_tokens=8)
    return tokenizer.batch_decode(generated, skip_special_tokens=True)


def test_opus_mt_model_converts_fine_tunes_publishes_and_loads_elsewhere_with_its_tokenizer(tmp_path):
    opus_mt_checkpoint(tmp_path / "opus-mt-en-de")
    converted = tmp_path / "converted"
    convert_checkpoint(tmp_path / "opus-mt-en-de", converted)
    assert json.loads((converted / "tokenizer_config.json").read_text())["tokenizer_class"] == "MarianTokenizer"
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert isinstance(tokenizer, MarianTokenizer)
    original = MarianTokenizer.from_pretrained(tmp_path / "opus-mt-en-de")
    assert tokenizer(SENTENCES).input_ids == original(SENTENCES).input_ids

    finetuned = tmp_path / "finetuned"
    train(["--model_name_or_path", str(converted), "--output_dir", str(finetuned), "--max_steps", "3",
           "--per_device_train_batch_size", "8", "--toy_corpus", "--toy_train_size", "64", "--toy_eval_size", "4",
           "--generation_max_length", "8", "--generation_num_beams", "1", "--warmup_steps", "1"])  # fmt: skip
    model = AutoModelForSeq2SeqLM.from_pretrained(finetuned)
    before = AutoModelForSeq2SeqLM.from_pretrained(converted)
    assert not torch.equal(model.lm_head.weight, before.lm_head.weight)  # it trained
    assert isinstance(AutoTokenizer.from_pretrained(finetuned), MarianTokenizer)
    expected = translations(model, AutoTokenizer.from_pretrained(finetuned))

    with LocalHub() as hub:
        environment = hub_environment(hub, tmp_path / "alice")
        published = subprocess.run(
            [sys.executable, "scripts/push_to_hub.py", "alice/opus-mt-en-de-finetuned", str(finetuned)],
            capture_output=True, text=True, cwd=ROOT, timeout=300, env=environment,
        )  # fmt: skip
        assert published.returncode == 0, published.stderr[-3000:]
        repo = hub.state.repos["alice/opus-mt-en-de-finetuned"]
        card = repo.commits[repo.branches["main"]]["README.md"].decode()
        assert 'from_pretrained("alice/opus-mt-en-de-finetuned"' in card  # the card names the repo it is in
        assert "base_model:" not in card  # the base was a local folder, not a Hub id
        pulled = client(hub, tmp_path / "bob", "marian", "alice/opus-mt-en-de-finetuned", json.dumps(SENTENCES))
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    assert json.loads(pulled.stdout.strip().splitlines()[-1]) == {"tokenizer": "MarianTokenizer",
                                                                   "translations": expected}  # fmt: skip
