"""export_ctranslate2 / scripts/export.py ctranslate2: CTranslate2's beam search gives generate()'s tokens and its
token log-probabilities agree to 1e-4, for each model variant the project trains or converts; bad input is refused
before anything is written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration, export_onnx
from hf_attention.hub.marian_conversion import convert_checkpoint
from hf_attention.inference.ctranslate2_export import export_ctranslate2
from hf_attention.inference.errors import ExportError

from .helpers import require_module, toy_tokenizer

ctranslate2 = require_module("ctranslate2")

ROOT = Path(__file__).parent.parent
SOURCES = ["we buy two dogs", "they sell ninety one trees", "i see five cats"]
VARIANTS = {
    "paper": {},
    "split sinusoids, decoding from pad": {"sinusoidal_layout": "split", "decoder_start_token_id": "pad"},
    "pre-LN, GELU, learned positions": {"normalize_before": True, "activation_function": "gelu",
                                        "position_embedding_type": "learned"},
    "separate embeddings": {"share_encoder_decoder_embeddings": False, "tie_word_embeddings": False},
}  # fmt: skip


def saved_model(folder: Path, **overrides) -> Path:
    tokenizer = toy_tokenizer()
    if overrides.get("decoder_start_token_id") == "pad":
        overrides["decoder_start_token_id"] = tokenizer.pad_token_id
    special = {name: getattr(tokenizer, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    config = HfAttentionConfig.from_preset(
        "tiny", vocab_size=len(tokenizer), **special, **{"decoder_start_token_id": tokenizer.bos_token_id, **overrides}
    )
    torch.manual_seed(0)
    HfAttentionForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def assert_ctranslate2_decodes_as_generate(model_dir: Path, exported: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(exported)
    model.generation_config.forced_eos_token_id = None  # CTranslate2 does not force </s> at the length limit
    translator = ctranslate2.Translator(str(exported), device="cpu")
    sources = [tokenizer.convert_ids_to_tokens(ids) for ids in tokenizer(SOURCES)["input_ids"]]
    results = translator.translate_batch(sources, beam_size=4, max_decoding_length=10)
    hypotheses = [result.hypotheses[0] for result in results]
    target_ids = getattr(tokenizer, "target_encoder", tokenizer.get_vocab())  # a MarianTokenizer's second vocabulary
    special = {tokenizer.pad_token_id, tokenizer.eos_token_id, model.config.decoder_start_token_id}
    for sentence, hypothesis in zip(SOURCES, hypotheses, strict=True):
        generated = model.generate(**tokenizer([sentence], return_tensors="pt"), num_beams=4, max_new_tokens=10)
        assert [token for token in generated[0].tolist() if token not in special] == (
            [target_ids[token] for token in hypothesis]
        ), sentence
    scores = translator.score_batch(sources, hypotheses)
    for sentence, hypothesis, score in zip(SOURCES, hypotheses, scores, strict=True):
        targets = [*(target_ids[token] for token in hypothesis), tokenizer.eos_token_id]
        decoder_inputs = torch.tensor([[model.config.decoder_start_token_id, *targets[:-1]]])
        with torch.no_grad():
            logits = model(**tokenizer([sentence], return_tensors="pt"), decoder_input_ids=decoder_inputs).logits
        ours = torch.log_softmax(logits[0], dim=-1)[torch.arange(len(targets)), torch.tensor(targets)]
        torch.testing.assert_close(torch.tensor(score.log_probs), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ctranslate2_beam_search_and_log_probabilities_equal_generate(tmp_path, variant):
    model_dir = saved_model(tmp_path / "model", **VARIANTS[variant])
    exported = export_ctranslate2(model_dir, tmp_path / "ct2")
    assert (exported / "model.bin").is_file() and (exported / "tokenizer.json").is_file()
    assert_ctranslate2_decodes_as_generate(model_dir, exported)


@pytest.mark.parametrize("separate_vocabs", [False, True], ids=["joint vocabulary", "separate vocabularies"])
def test_a_converted_opus_mt_model_exports_with_its_pad_token_last(tmp_path, separate_vocabs):
    """opus-mt's layout (pad last, decoding from pad, a final logits bias, MarianTokenizer): CTranslate2's own
    converter drops the pad token from such vocabularies; this export keeps every row. With separate vocabularies
    the target tokens come from the MarianTokenizer's target vocabulary."""
    require_module("sentencepiece")
    from .test_opus_mt import opus_mt_checkpoint

    opus_mt_checkpoint(tmp_path / "opus-mt-en-de", separate_vocabs=separate_vocabs)
    convert_checkpoint(str(tmp_path / "opus-mt-en-de"), str(tmp_path / "converted"))
    model = HfAttentionForConditionalGeneration.from_pretrained(tmp_path / "converted")
    if separate_vocabs:
        assert model.config.target_vocab_size != model.config.vocab_size
        assert model.config.pad_token_id == 2 == model.config.decoder_start_token_id
    else:
        assert model.config.pad_token_id == model.config.vocab_size - 1 == model.config.decoder_start_token_id
    exported = export_ctranslate2(tmp_path / "converted", tmp_path / "ct2")
    assert_ctranslate2_decodes_as_generate(tmp_path / "converted", exported)
    if separate_vocabs:
        target_vocab = json.loads((tmp_path / "opus-mt-en-de" / "target_vocab.json").read_text())
        exported_tokens = json.loads((exported / "target_vocabulary.json").read_text())
        assert exported_tokens == sorted(target_vocab, key=target_vocab.get)


def test_int8_export_through_the_script_translates(tmp_path):
    model_dir = saved_model(tmp_path / "model")
    script = [sys.executable, "scripts/export.py", "ctranslate2", str(model_dir), str(tmp_path / "ct2")]
    result = subprocess.run([*script, "--quantization", "int8"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu", compute_type="int8")
    assert translator.translate_batch([["▁we", "</s>"]], max_decoding_length=4)[0].hypotheses


def test_bad_input_is_refused_in_one_line_and_writes_nothing(tmp_path, monkeypatch):
    model_dir = saved_model(tmp_path / "model")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep")
    with pytest.raises(ExportError, match="--quantization int4: must be one of int8"):
        export_ctranslate2(model_dir, tmp_path / "out", quantization="int4")
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export_ctranslate2(model_dir, existing)
    assert [path.name for path in existing.iterdir()] == ["mine.txt"]
    held = sorted(path.name for path in model_dir.iterdir())
    for destination in (model_dir, tmp_path):  # the source itself, or a folder holding it
        with pytest.raises(ExportError, match=f"DESTINATION {destination} holds SOURCE {model_dir}"):
            export_ctranslate2(model_dir, destination, overwrite=True)
    with pytest.raises(ExportError, match="holds SOURCE"):
        export_onnx(model_dir, model_dir, overwrite=True)
    assert sorted(path.name for path in model_dir.iterdir()) == held
    tanh = saved_model(tmp_path / "tanh", activation_function="tanh")
    with pytest.raises(ExportError, match="activation_function='tanh': CTranslate2 offers"):
        export_ctranslate2(tanh, tmp_path / "out")
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # as if the extra were not installed
    with pytest.raises(ExportError, match=r"pip install 'hf_attention\[ctranslate2\]'"):
        export_ctranslate2(model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = subprocess.run([sys.executable, "scripts/export.py", "ctranslate2", str(model_dir), str(existing)],
                            cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        f"error: {existing} already exists; pass --overwrite to replace it."
    ]
