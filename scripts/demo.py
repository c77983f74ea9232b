"""Train a small Transformer on the embedded toy corpus, save, reload and translate (see `--help`)."""

from hf_attention.demo import main

if __name__ == "__main__":
    main()
