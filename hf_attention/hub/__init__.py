"""The Hugging Face Hub: publishing a trained run (`publishing`, `hf-attention-push`), its model card (`model_card`),
and models arriving from Marian / opus-mt checkpoints (`marian_conversion`, `hf-attention-convert-marian`)."""
