"""Publish a trained folder (model, code, pipelines, tokenizer, card) to the Hub; --dry_run lists the files first."""

from hf_attention.hub.publishing import main

if __name__ == "__main__":
    main()
