"""Export a trained model for another inference engine: `export.py ctranslate2 SOURCE DESTINATION` (see --help)."""

from hf_attention.inference.export import main

if __name__ == "__main__":
    main()
