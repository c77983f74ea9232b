"""export_onnx / scripts/export.py onnx: the encoder, first-step and cached-step graphs give the logits of the model at
every step (teacher-forced, padded batch, shapes other than the export's), onnxruntime's greedy decoding gives
generate()'s tokens, and translate.py's onnx engine gives the torch engine's translations."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration
from hf_attention.ctranslate2_export import ExportError
from hf_attention.onnx_export import OnnxGreedyTranslator, export_onnx

from .helpers import toy_tokenizer

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

ROOT = Path(__file__).parent.parent
SOURCES = ["we buy two dogs", "they sell ninety one trees and five houses", "i see cats"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    tokenizer = toy_tokenizer()
    special = {name: getattr(tokenizer, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    config = HfAttentionConfig.from_preset("tiny", vocab_size=len(tokenizer), **special, sinusoidal_layout="split")
    torch.manual_seed(5)
    model = HfAttentionForConditionalGeneration(config).eval()
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    export_onnx(folder / "model", folder / "onnx")
    return folder / "model", folder / "onnx", model, tokenizer


def test_the_cached_graphs_give_the_model_s_logits_at_every_step(exported):
    _, onnx_dir, model, tokenizer = exported
    translator = OnnxGreedyTranslator(onnx_dir)
    batch = tokenizer(SOURCES, return_tensors="np", padding=True)
    targets = np.random.default_rng(0).integers(3, len(tokenizer), size=(3, 6))
    decoder_inputs = np.concatenate([np.full((3, 1), model.config.decoder_start_token_id), targets], axis=1)
    with torch.no_grad():
        expected = model(**tokenizer(SOURCES, return_tensors="pt", padding=True),
                         decoder_input_ids=torch.from_numpy(decoder_inputs)).logits.numpy()  # fmt: skip
    logits = translator.forced_logits(batch["input_ids"], batch["attention_mask"], decoder_inputs)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_onnxruntime_greedy_decoding_gives_generate_s_tokens(exported):
    _, onnx_dir, model, tokenizer = exported
    batch = tokenizer(SOURCES, return_tensors="np", padding=True)
    tokens = OnnxGreedyTranslator(onnx_dir).generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=12)
    expected = model.generate(**tokenizer(SOURCES, return_tensors="pt", padding=True), max_new_tokens=12)
    np.testing.assert_array_equal(tokens, expected.numpy())


def test_translate_py_onnx_engine_matches_the_torch_engine(tmp_path, exported):
    model_dir, onnx_dir, _, _ = exported
    source = tmp_path / "source.txt"
    source.write_text("".join(f"{line}\n" for line in SOURCES))
    outputs = {}
    for engine, model in (("torch", model_dir), ("onnx", onnx_dir)):
        outputs[engine] = tmp_path / f"{engine}.txt"
        command = [sys.executable, "scripts/translate.py", "--model", str(model), "--engine", engine, "--input",
                   str(source), "--output", str(outputs[engine]), "--num_beams", "1",
                   "--max_new_tokens", "12"]  # fmt: skip
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    assert outputs["onnx"].read_text() == outputs["torch"].read_text()
    with pytest.raises(SystemExit, match="--engine onnx decodes greedily: pass --num_beams 1"):
        from hf_attention.translation import main

        main(["--model", str(onnx_dir), "--engine", "onnx", "--input", str(source), "--num_beams", "4"])


def test_export_refuses_an_existing_folder_and_names_the_missing_extra(tmp_path, exported, monkeypatch):
    model_dir, _, _, _ = exported
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export_onnx(model_dir, existing)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ExportError, match=r"pip install 'hf_attention\[onnx\]'"):
        export_onnx(model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not any(existing.iterdir())
