"""Render attention heatmaps (encoder, decoder, cross; per layer, heads in a grid) for one sentence (see --help)."""

from hf_attention.attention_maps import main

if __name__ == "__main__":
    main()
