"""Shared fixtures: a seeded tiny config and small padded batches (right padding, as tokenizers produce)."""

import pytest
import torch

from hf_attention import HfAttentionConfig
from hf_attention.training import job as run_translation

PAD, BOS, EOS = 0, 1, 2

# Marian's conventions (see hf_attention.hub.marian_conversion): split sinusoid, logits bias, a separate target
# vocabulary.
MARIAN_STYLE = {
    "sinusoidal_layout": "split",
    "add_final_logits_bias": True,
    "share_encoder_decoder_embeddings": False,
    "decoder_vocab_size": 120,
}


@pytest.fixture
def tiny_config() -> HfAttentionConfig:
    torch.manual_seed(0)
    return HfAttentionConfig(
        vocab_size=99,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        dropout=0.0,
    )


def padded_batch(lengths: list[int], max_length: int, vocab_size: int = 99, seed: int = 0) -> dict:
    """Right-padded ids ending in EOS, with the matching attention mask."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (len(lengths), max_length), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, length - 1] = EOS
        input_ids[row, length:] = PAD
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture
def source_batch() -> dict:
    return padded_batch([7, 4, 6], max_length=7)


@pytest.fixture
def target_batch() -> dict:
    return padded_batch([5, 3, 5], max_length=5, seed=1)


@pytest.fixture
def recorded_batches(monkeypatch):
    """The source ids of every training batch the job collates, in order."""
    batches = []
    collator_call = run_translation.PaddingCounter.__call__

    def recording(self, features):
        batch = collator_call(self, features)
        batches.append(batch["input_ids"].tolist())
        return batch

    monkeypatch.setattr(run_translation.PaddingCounter, "__call__", recording)
    return batches
