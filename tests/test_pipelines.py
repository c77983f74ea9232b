"""The translation / text2text-generation / summarization pipelines: registered, declared in saved configs, and
loadable with trust_remote_code where hf_attention is not installed."""

import json
import logging
import os
import textwrap

import pytest
import torch
from transformers import pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration, TranslationPipeline
from hf_attention.training.job import main

from .helpers import run_without_hf_attention, toy_tokenizer

SOURCES = ["we buy two dogs", "they sell ninety one trees", "i see five cats"]


@pytest.fixture
def checkpoint(tmp_path):
    """A saved tiny model and tokenizer, as a user would publish them."""
    tokenizer = toy_tokenizer()
    torch.manual_seed(0)
    model = HfAttentionForConditionalGeneration(HfAttentionConfig.from_preset("tiny", vocab_size=len(tokenizer)))
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model.eval(), tokenizer


def expected_translations(model, tokenizer, sources, **generate_kwargs):
    batch = tokenizer(sources, return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = model.generate(**batch, **generate_kwargs)
    return tokenizer.batch_decode(generated, skip_special_tokens=True)


def test_saved_checkpoint_declares_the_pipelines_and_carries_their_code(checkpoint):
    folder, _, _ = checkpoint
    config = json.loads((folder / "config.json").read_text())
    assert set(config["custom_pipelines"]) == {"translation", "text2text-generation", "summarization"}
    assert config["custom_pipelines"]["translation"]["impl"] == "pipeline_hf_attention.TranslationPipeline"
    assert (folder / "pipeline_hf_attention.py").is_file()
    assert PIPELINE_REGISTRY.check_task("translation")[1]["impl"] is TranslationPipeline


@pytest.mark.parametrize("batch_size", [1, 2])
def test_translation_pipeline_gives_generate_outputs_with_options_passed_through(checkpoint, batch_size):
    folder, model, tokenizer = checkpoint
    translator = pipeline("translation", model=str(folder), trust_remote_code=True, device="cpu")
    outputs = translator(SOURCES, batch_size=batch_size, num_beams=3, max_new_tokens=7)
    # Each input is encoded alone and padding leaves real tokens unchanged, so batching gives the same text.
    expected = [expected_translations(model, tokenizer, [s], num_beams=3, max_new_tokens=7)[0] for s in SOURCES]
    assert [output["translation_text"] for output in outputs] == expected
    assert translator.model.device.type == "cpu"
    several = translator(SOURCES[0], num_beams=3, num_return_sequences=2, max_new_tokens=5)
    assert len(several) == 2 and all("translation_text" in item for item in several)
    ids = translator(SOURCES[0], return_tensors=True, max_new_tokens=5)[0]["translation_token_ids"]
    assert isinstance(ids, torch.Tensor)


@pytest.mark.parametrize("task, key", [("text2text-generation", "generated_text"), ("summarization", "summary_text")])
def test_other_seq2seq_tasks_name_their_outputs(checkpoint, task, key):
    folder, model, tokenizer = checkpoint
    pipe = pipeline(task, model=str(folder), trust_remote_code=True)
    assert pipe(SOURCES[0], max_new_tokens=5) == [
        {key: expected_translations(model, tokenizer, SOURCES[:1], max_new_tokens=5)[0]}
    ]


def test_bad_pipeline_input_is_named(checkpoint):
    folder, _, _ = checkpoint
    translator = pipeline("translation", model=str(folder), trust_remote_code=True)
    with pytest.raises(TypeError, match="takes a string or a list of strings, got int"):
        translator(42)
    with pytest.raises(ValueError, match="need a multilingual tokenizer"):
        translator(SOURCES[0], src_lang="en", tgt_lang="de")


@pytest.mark.parametrize("task", ["translation", "translation_en_to_de", "text2text-generation", "summarization"])
@pytest.mark.parametrize("source", ["folder", "model object"])
def test_pipeline_takes_the_seq2seq_tasks_without_remote_code_once_hf_attention_is_imported(checkpoint, task, source):
    folder, model, tokenizer = checkpoint
    arguments = {"model": str(folder)} if source == "folder" else {"model": model, "tokenizer": tokenizer}
    pipe = pipeline(task, **arguments)  # no trust_remote_code: the installed classes, not the folder's copy
    assert type(pipe).__module__ == "hf_attention.pipeline_hf_attention"
    expected = expected_translations(model, tokenizer, SOURCES, num_beams=2, max_new_tokens=8)
    outputs = pipe(SOURCES, num_beams=2, max_new_tokens=8)
    assert [next(iter(output.values())) for output in outputs] == expected


def test_a_trained_models_generation_config_never_clashes_with_max_new_tokens(tmp_path, caplog):
    main(["--toy_corpus", "--output_dir", str(tmp_path), "--max_steps", "1", "--vocab_size", "120",
          "--toy_train_size", "100", "--toy_eval_size", "2", "--generation_max_length", "8",
          "--generation_num_beams", "1"])  # fmt: skip
    assert json.loads((tmp_path / "generation_config.json").read_text())["max_new_tokens"] == 8
    translator = pipeline("translation", model=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        translator(SOURCES[0], max_new_tokens=4)
    assert "max_length" not in caplog.text


@pytest.mark.parametrize("option", ["num_beams", "max_new_tokens", "num_return_sequences", "batch_size"])
def test_pipeline_options_that_must_be_positive_are_named(checkpoint, option):
    folder, model, tokenizer = checkpoint
    translator = TranslationPipeline(model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=f"`{option}` 0: must be a positive integer"):
        translator(SOURCES, **{option: 0})


REMOTE_PIPELINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from transformers import pipeline
    translator = pipeline("translation", model=sys.argv[1], trust_remote_code=True)
    assert "hf_attention" not in type(translator.model).__module__.split(".")[0]
    outputs = translator(json.loads(sys.argv[2]), batch_size=2, num_beams=2, max_new_tokens=6)
    print(json.dumps([output["translation_text"] for output in outputs]))
    """
)


def test_translation_pipeline_works_where_hf_attention_is_not_installed(checkpoint, tmp_path):
    folder, model, tokenizer = checkpoint
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = run_without_hf_attention(
        REMOTE_PIPELINE_SCRIPT, str(folder), json.dumps(SOURCES), environment=environment
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [expected_translations(model, tokenizer, [s], num_beams=2, max_new_tokens=6)[0] for s in SOURCES]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
