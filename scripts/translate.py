"""Translate a file with a trained model: `translate.py --model M --input FILE --output FILE` (see --help)."""

from hf_attention.inference.translate import main

if __name__ == "__main__":
    main()
