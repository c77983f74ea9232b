"""export_onnx / scripts/export.py onnx: the encoder, first-step and cached-step graphs give the logits of the model at
every step (teacher-forced, padded batch, shapes other than the export's); transformers' generate() over them
(OnnxModelForSeq2SeqLM) gives the PyTorch model's tokens for greedy search, beam search and sampling; translate.py's
onnx engine gives the torch engine's translations."""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import pipeline

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration
from hf_attention.inference.errors import ExportError
from hf_attention.inference.evaluate import EvaluationArguments, evaluate_saved_model
from hf_attention.inference.onnx_export import OnnxModelForSeq2SeqLM, export_onnx

from .helpers import require_module, toy_tokenizer

require_module("onnxruntime")
require_module("onnxscript")

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
    onnx_model = OnnxModelForSeq2SeqLM.from_pretrained(onnx_dir)
    batch = tokenizer(SOURCES, return_tensors="pt", padding=True)
    targets = torch.from_numpy(np.random.default_rng(0).integers(3, len(tokenizer), size=(3, 6)))
    decoder_inputs = torch.cat([torch.full((3, 1), model.config.decoder_start_token_id), targets], dim=1)
    with torch.no_grad():
        expected = model(**batch, decoder_input_ids=decoder_inputs).logits
    encoded, cache, logits = onnx_model.get_encoder()(**batch), None, []
    for position in range(decoder_inputs.shape[1]):
        step = onnx_model(encoder_outputs=encoded, attention_mask=batch["attention_mask"],
                          decoder_input_ids=decoder_inputs[:, position : position + 1], cache=cache)  # fmt: skip
        cache = step.cache
        logits.append(step.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one token per step"):
        onnx_model(**batch, decoder_input_ids=decoder_inputs)


def test_the_graphs_run_with_threads_that_do_not_spin_unless_the_caller_passes_options(exported, monkeypatch):
    """onnxruntime's spinning threads took the cores that generate()'s torch operations need between two runs."""
    import onnxruntime

    _, onnx_dir, _, _ = exported
    created = []
    session = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda path, options, **kwargs: created.append(options)
                        or session(path, options, **kwargs))  # fmt: skip
    OnnxModelForSeq2SeqLM.from_pretrained(onnx_dir)
    assert len(created) == 3
    assert {options.get_session_config_entry("session.intra_op.allow_spinning") for options in created} == {"0"}
    own = onnxruntime.SessionOptions()
    own.intra_op_num_threads = 1
    OnnxModelForSeq2SeqLM.from_pretrained(onnx_dir, session_options=own)
    assert created[3:] == [own] * 3


GENERATION = {
    "greedy": {},
    "beam_search": {"num_beams": 4, "num_return_sequences": 2, "length_penalty": 0.6},
    "sampling": {"do_sample": True, "top_k": 20, "temperature": 0.8},
}


@pytest.mark.parametrize("strategy", GENERATION)
def test_generate_over_the_onnx_graphs_gives_the_pytorch_model_s_tokens(exported, strategy):
    _, onnx_dir, model, tokenizer = exported
    onnx_model = OnnxModelForSeq2SeqLM.from_pretrained(onnx_dir)
    batch = tokenizer(SOURCES, return_tensors="pt", padding=True)
    settings = {"max_new_tokens": 12, "return_dict_in_generate": True, "output_scores": True, **GENERATION[strategy]}
    outputs = []
    for candidate in (onnx_model, model):
        torch.manual_seed(3)  # sampling draws the same numbers for both
        outputs.append(candidate.generate(**batch, **settings))
    ours, expected = outputs
    assert torch.equal(ours.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(ours.scores), torch.stack(expected.scores), atol=1e-4, rtol=1e-4)


def test_constrained_search_over_the_onnx_graphs_gives_the_pytorch_model_s_tokens(exported):
    from hf_attention.constraints_hf_attention import LexicalConstraints

    _, onnx_dir, model, tokenizer = exported
    batch = tokenizer(SOURCES, return_tensors="pt", padding=True)
    phrase = tuple(tokenizer(text_target="hunde kaufen", add_special_tokens=False)["input_ids"])
    constraints = [LexicalConstraints.from_token_ids(include=[phrase])] * len(SOURCES)
    found = [candidate.generate(**batch, num_beams=3, max_new_tokens=12, constraints=constraints)
             for candidate in (OnnxModelForSeq2SeqLM.from_pretrained(onnx_dir), model)]  # fmt: skip
    assert torch.equal(found[0], found[1])
    assert all("hunde kaufen" in text for text in tokenizer.batch_decode(found[0], skip_special_tokens=True))


def test_the_onnx_model_stops_at_the_source_length_limit_as_the_pytorch_model_does(exported):
    """§6.1's input length + k (`max_new_tokens_over_source`), when the call sets no length itself."""
    _, onnx_dir, model, tokenizer = exported
    onnx_model = OnnxModelForSeq2SeqLM.from_pretrained(onnx_dir)
    batch = tokenizer(SOURCES, return_tensors="pt", padding=True)
    outputs = []
    for candidate in (onnx_model, model):
        candidate.generation_config.max_new_tokens_over_source = 2
        outputs.append(candidate.generate(**batch, min_new_tokens=40))
    del model.generation_config.max_new_tokens_over_source
    assert torch.equal(outputs[0], outputs[1]) and outputs[0].shape[1] == 1 + batch["input_ids"].shape[1] + 2


def test_the_translation_pipeline_runs_on_the_onnx_model(exported):
    _, onnx_dir, model, tokenizer = exported
    translations = [
        pipeline("translation", model=candidate, tokenizer=tokenizer)(SOURCES, max_new_tokens=12, num_beams=3)
        for candidate in (OnnxModelForSeq2SeqLM.from_pretrained(onnx_dir), model)
    ]
    assert translations[0] == translations[1] and len(translations[0]) == len(SOURCES)


@pytest.mark.slow  # 30 s; the graphs' tokens equal the model's in the tests above
def test_translate_py_and_evaluate_model_give_the_torch_engine_s_translations_with_the_onnx_engine(
    tmp_path, exported, monkeypatch
):
    model_dir, onnx_dir, _, _ = exported
    source, test_file = tmp_path / "source.txt", tmp_path / "test.tsv"
    source.write_text("".join(f"{line}\n" for line in SOURCES))
    test_file.write_text("".join(f"{line}\t{line}\n" for line in SOURCES))
    outputs, reports = {}, {}
    for engine, folder in (("torch", model_dir), ("onnx", onnx_dir)):
        outputs[engine] = tmp_path / f"{engine}.txt"
        command = [sys.executable, "scripts/translate.py", "--model", str(folder), "--engine", engine, "--input",
                   str(source), "--output", str(outputs[engine]), "--num_beams", "4",
                   "--max_new_tokens", "12", "--quantization", "none"]  # fmt: skip
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        reports[engine] = evaluate_saved_model(EvaluationArguments(
            model_dir=str(folder), test_file=str(test_file), engine=engine, max_new_tokens=12, progress=False
        ))  # fmt: skip
    assert outputs["onnx"].read_text() == outputs["torch"].read_text()
    assert reports["onnx"]["translations"] == reports["torch"]["translations"]
    assert reports["onnx"]["bleu"] == reports["torch"]["bleu"] and reports["onnx"]["engine"] == "onnx"
    # From the model's own folder the engine exports it first, to a temporary folder deleted once loaded.
    (tmp_path / "temporary").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temporary"))
    from_model = evaluate_saved_model(EvaluationArguments(
        model_dir=str(model_dir), test_file=str(test_file), engine="onnx", max_new_tokens=12, progress=False
    ))  # fmt: skip
    assert from_model["translations"] == reports["torch"]["translations"]
    assert list((tmp_path / "temporary").iterdir()) == []


def test_export_refuses_an_existing_folder_and_names_the_missing_extra(tmp_path, exported, monkeypatch):
    model_dir, _, _, _ = exported
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export_onnx(model_dir, existing)
    with pytest.raises(ExportError, match="holds no encoder.onnx, decoder.onnx, decoder_with_past.onnx"):
        OnnxModelForSeq2SeqLM.from_pretrained(model_dir)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ExportError, match=r"pip install 'hf_attention\[onnx\]'"):
        export_onnx(model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not any(existing.iterdir())
