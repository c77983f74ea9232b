"""Shared fixtures: a seeded tiny config and small padded batches (right padding, as tokenizers produce). What tests
import lives in `helpers.py`."""

import pytest
import torch

from hf_attention import HfAttentionConfig
from hf_attention.training import job as run_translation

from .helpers import padded_batch


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
