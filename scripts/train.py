"""Train or fine-tune a translation Transformer and evaluate it (see --help); runs under `accelerate launch` too."""

from hf_attention.training.job import main

if __name__ == "__main__":
    main()
