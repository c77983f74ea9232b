"""The two Hub users of tests/test_hub_roundtrip.py, each run as a fresh process (HF_ENDPOINT is read at import).

python tests/hub_client.py push FOLDER REPO_ID [--private]   # with hf_attention: plain push_to_hub calls
python tests/hub_client.py pull REPO_ID BATCH OUT [--revision R]  # hf_attention NOT importable
python tests/hub_client.py translate REPO_ID SENTENCE [--installed]  # pipeline("translation", model=REPO_ID)
python tests/hub_client.py marian REPO_ID SENTENCES_JSON  # a fine-tuned opus-mt model, hf_attention NOT importable
"""

import sys


def hide_hf_attention() -> None:
    sys.modules["hf_attention"] = None  # as on a machine where hf_attention is not installed


def push(folder: str, repo_id: str, private: bool) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    import hf_attention  # noqa: F401 - registers the model, so push_to_hub writes the code too

    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    commit = model.push_to_hub(repo_id, private=private)
    AutoTokenizer.from_pretrained(folder).push_to_hub(repo_id, private=private)
    print(commit.oid)


def pull(repo_id: str, batch_file: str, out_file: str, revision: str | None) -> None:
    hide_hf_attention()
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(repo_id, trust_remote_code=True, revision=revision).eval()
    tokenizer = AutoTokenizer.from_pretrained(repo_id, revision=revision)
    assert not type(model).__module__.startswith("hf_attention")
    batch = torch.load(batch_file)
    with torch.no_grad():
        logits = model(**batch, decoder_input_ids=batch["input_ids"]).logits
    generated = model.generate(**batch, num_beams=2, max_new_tokens=6)
    torch.save({"logits": logits, "generated": generated, "pad_token_id": tokenizer.pad_token_id}, out_file)


def translate(repo_id: str, sentence: str, installed: bool) -> None:
    """Without hf_attention, trust_remote_code runs the repo's pipeline code; with it, the installed code runs."""
    import json

    if installed:
        import transformers

        import hf_attention  # noqa: F401 - brings back the seq2seq pipelines for hf_attention models

        translator = transformers.pipeline("translation", model=repo_id)  # looked up after hf_attention's import
        assert type(translator).__module__ == "hf_attention.pipeline_hf_attention"
    else:
        hide_hf_attention()
        from transformers import pipeline

        translator = pipeline("translation", model=repo_id, trust_remote_code=True)
    print(json.dumps(translator([sentence, sentence[::-1]], batch_size=2, num_beams=2, max_new_tokens=6)))


def marian(repo_id: str, sentences: str) -> None:
    """A fine-tuned opus-mt model: its MarianTokenizer and the model load where hf_attention is not installed."""
    hide_hf_attention()
    import json

    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(repo_id, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)
    batch = tokenizer(json.loads(sentences), return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = model.generate(**batch, num_beams=2, max_new_tokens=8)
    translations = tokenizer.batch_decode(generated, skip_special_tokens=True)
    print(json.dumps({"tokenizer": type(tokenizer).__name__, "translations": translations}))


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "marian":
        marian(*arguments)
    elif command == "translate":
        translate(arguments[0], arguments[1], installed="--installed" in arguments)
    elif command == "push":
        push(arguments[0], arguments[1], private="--private" in arguments)
    else:
        revision = arguments[arguments.index("--revision") + 1] if "--revision" in arguments else None
        pull(arguments[0], arguments[1], arguments[2], revision)
