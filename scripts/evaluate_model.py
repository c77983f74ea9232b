"""Score a saved model on a parallel test set with BLEU and chrF (sacreBLEU) and write a JSON report (see --help)."""

from hf_attention.inference.evaluate import main

if __name__ == "__main__":
    main()
