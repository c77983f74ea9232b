"""Convert a MarianMTModel checkpoint to hf_attention or back: `convert_marian.py SOURCE DESTINATION` (see --help)."""

from hf_attention.hub.marian_conversion import main

if __name__ == "__main__":
    main()
