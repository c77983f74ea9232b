"""PEFT LoRA adapters on the attention projections: train, save, reload onto the base model, merge, publish."""

import subprocess
import sys
import textwrap

import pytest
import torch

from hf_attention import HfAttentionForConditionalGeneration

from .helpers import hub_environment, padded_batch, require_module, run_without_hf_attention
from .hub_server import LocalHub

peft = require_module("peft")


def train_adapter(base_folder, steps: int = 5):
    """LoRA on q/k/v/out projections of every attention, a few optimiser steps on a fixed batch."""
    model = HfAttentionForConditionalGeneration.from_pretrained(base_folder)
    config = peft.LoraConfig(
        task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    peft_model = peft.get_peft_model(model, config)
    batch = padded_batch([6, 4], max_length=6, vocab_size=99)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return peft_model.eval(), batch


@pytest.fixture
def base_folder(tiny_config, tmp_path):
    HfAttentionForConditionalGeneration(tiny_config).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_lora_config_without_target_modules_adapts_every_attention_projection(tiny_config):
    config = peft.LoraConfig(task_type="SEQ_2_SEQ_LM")  # no target_modules: hf_attention's defaults
    peft_model = peft.get_peft_model(HfAttentionForConditionalGeneration(tiny_config), config)
    suffix = ".lora_A.default"
    adapted = {name.removesuffix(suffix) for name, _ in peft_model.named_modules() if name.endswith(suffix)}
    attentions = [f"encoder.layers.{i}.self_attn" for i in range(tiny_config.encoder_layers)]
    attentions += [f"decoder.layers.{i}.{kind}" for i in range(tiny_config.decoder_layers)
                   for kind in ("self_attn", "encoder_attn")]  # fmt: skip
    projections = ("q_proj", "k_proj", "v_proj", "out_proj")
    assert adapted == {
        f"base_model.model.model.{attention}.{name}" for attention in attentions for name in projections
    }


def logits(model, batch):
    with torch.no_grad():
        return model(**batch, decoder_input_ids=batch["input_ids"]).logits


def test_lora_trains_only_adapters_and_survives_save_reload_and_merge(base_folder, tmp_path):
    peft_model, batch = train_adapter(base_folder)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("encoder_attn.q_proj" in name for name in trainable)  # cross-attention adapted too
    expected = logits(peft_model, batch)
    base = HfAttentionForConditionalGeneration.from_pretrained(base_folder).eval()
    assert not torch.allclose(logits(base, batch), expected)  # the adapter changed the model

    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=0)
    merged = reloaded.merge_and_unload()
    assert isinstance(merged, HfAttentionForConditionalGeneration)
    torch.testing.assert_close(logits(merged, batch), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged.generate(**batch, max_new_tokens=5), peft_model.generate(**batch, max_new_tokens=5))


PULL_ADAPTER = textwrap.dedent(
    """
    import sys
    import torch
    from peft import AutoPeftModelForSeq2SeqLM
    model = AutoPeftModelForSeq2SeqLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    batch = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(model(**batch, decoder_input_ids=batch["input_ids"]).logits, sys.argv[3])
    """
)
PUSH = textwrap.dedent(
    """
    import sys
    import hf_attention
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM
    base = AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1])
    base.push_to_hub("alice/base")
    adapter = PeftModel.from_pretrained(base, sys.argv[2])
    adapter.push_to_hub("alice/lora")
    """
)


@pytest.mark.slow  # 12 s; adapters save and load in the tests above
def test_adapter_is_pushed_and_pulled_like_a_model(base_folder, tmp_path):
    peft_model, batch = train_adapter(base_folder)
    peft_model.peft_config["default"].base_model_name_or_path = "alice/base"  # where the base is published
    peft_model.save_pretrained(tmp_path / "adapter")
    torch.save(batch, tmp_path / "batch.pt")
    with LocalHub() as hub:
        environment = hub_environment(hub, tmp_path / "home")
        pushed = subprocess.run([sys.executable, "-c", PUSH, str(base_folder), str(tmp_path / "adapter")],
                                capture_output=True, text=True, env=environment, timeout=300)  # fmt: skip
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        assert (
            "adapter_model.safetensors"
            in hub.state.repos["alice/lora"].commits[hub.state.repos["alice/lora"].branches["main"]]
        )
        arguments = ["alice/lora", str(tmp_path / "batch.pt"), str(tmp_path / "o.pt")]
        pulled = run_without_hf_attention(PULL_ADAPTER, *arguments, environment=hub_environment(hub, tmp_path / "bob"))
        assert pulled.returncode == 0, pulled.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "o.pt"), logits(peft_model, batch), rtol=0, atol=0)
