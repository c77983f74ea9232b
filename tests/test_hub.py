"""Auto classes, save -> reload, and checkpoints that carry their own code (trust_remote_code)."""

import json
import os
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration, HfAttentionModel

from .helpers import MARIAN_STYLE, padded_batch, run_without_hf_attention


def test_auto_classes_build_our_models(tiny_config):
    assert isinstance(AutoModelForSeq2SeqLM.from_config(tiny_config), HfAttentionForConditionalGeneration)
    assert isinstance(AutoModel.from_config(tiny_config), HfAttentionModel)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"share_encoder_decoder_embeddings": False},
        {"tie_word_embeddings": False},
        {"normalize_before": True},
        MARIAN_STYLE,
    ],
)
def test_save_and_reload_gives_identical_logits_and_no_missing_keys(tiny_config, tmp_path, overrides):
    config = HfAttentionConfig(**{**tiny_config.to_dict(), **overrides})
    model = HfAttentionForConditionalGeneration(config).eval()
    if config.add_final_logits_bias:
        model.final_logits_bias.normal_()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "pytorch_model.bin").exists()
    reloaded, info = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    batch = padded_batch([7, 4], max_length=7)
    with torch.no_grad():
        expected = model(**batch, decoder_input_ids=batch["input_ids"]).logits
        actual = reloaded.eval()(**batch, decoder_input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    decoder = reloaded.model.decoder.embed_tokens.weight
    assert (reloaded.lm_head.weight is decoder) == config.tie_word_embeddings
    assert (reloaded.model.encoder.embed_tokens.weight is decoder) == config.share_encoder_decoder_embeddings


def test_shared_embedding_is_stored_once(tiny_config, tmp_path):
    HfAttentionForConditionalGeneration(tiny_config).save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert sum(tensor.shape == (99, 16) for tensor in stored.values()) == 1


def test_saved_checkpoint_carries_its_code_and_auto_map(tiny_config, tmp_path):
    HfAttentionForConditionalGeneration(tiny_config).save_pretrained(tmp_path)
    assert {"modeling_hf_attention.py", "configuration_hf_attention.py"} <= set(os.listdir(tmp_path))
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_hf_attention.HfAttentionConfig"
    assert auto_map["AutoModelForSeq2SeqLM"] == "modeling_hf_attention.HfAttentionForConditionalGeneration"


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    try:
        import hf_attention  # noqa: F401
        raise SystemExit("hf_attention should not be importable here")
    except ImportError:
        pass
    import torch
    from transformers import AutoModelForSeq2SeqLM
    folder, batch_path, out_path = sys.argv[1:4]
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    batch = torch.load(batch_path)
    with torch.no_grad():
        logits = model(**batch, decoder_input_ids=batch["input_ids"]).logits
    generated = model.generate(**batch, num_beams=2, max_new_tokens=6)
    torch.save({"logits": logits, "generated": generated}, out_path)
    """
)


def test_remote_code_loads_where_hf_attention_is_not_installed(tiny_config, tmp_path):
    model = HfAttentionForConditionalGeneration(tiny_config).eval()
    model.save_pretrained(tmp_path / "checkpoint")
    batch = padded_batch([7, 4], max_length=7)
    torch.save(batch, tmp_path / "batch.pt")
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    arguments = [str(tmp_path / "checkpoint"), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")]
    result = run_without_hf_attention(REMOTE_CODE_SCRIPT, *arguments, environment=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = model(**batch, decoder_input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(remote["logits"], expected, rtol=0, atol=0)
    assert torch.equal(remote["generated"], model.generate(**batch, num_beams=2, max_new_tokens=6))


def test_auto_config_from_remote_code_folder_without_import(tiny_config, tmp_path):
    HfAttentionForConditionalGeneration(tiny_config).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert config.model_type == "hf_attention" and config.d_model == 16
