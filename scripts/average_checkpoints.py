"""Average the last N checkpoints of a run into one model, as the paper does (§6.1); see --help."""

from hf_attention.training.checkpoint_averaging import main

if __name__ == "__main__":
    main()
