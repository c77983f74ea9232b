"""Publish and consume through huggingface_hub's real client against a loopback Hub (tests/hub_server.py).

One user, with hf_attention, pushes with plain `push_to_hub` calls; another, in a fresh process where hf_attention is
not importable, pulls with `trust_remote_code=True` and must get identical logits and generations.
"""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration

from .helpers import hub_environment, padded_batch, toy_tokenizer
from .hub_server import LocalHub

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def hub():
    with LocalHub() as local_hub:
        yield local_hub
        routes = "\n".join(f"  {method} {route}" for method, route in sorted(local_hub.called(since_start=True)))
        print(f"\nHub endpoints the client called:\n{routes}")


def save_model(folder: Path, seed: int = 0) -> HfAttentionForConditionalGeneration:
    tokenizer = toy_tokenizer(vocab_size=99)
    torch.manual_seed(seed)
    config = HfAttentionConfig.from_preset("tiny", vocab_size=len(tokenizer), d_model=32, encoder_ffn_dim=64)
    model = HfAttentionForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def client(hub: LocalHub, home: Path, *arguments: str, token: bool = True, offline: bool = False):
    environment = hub_environment(hub, home, token=token, offline=offline)
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "hub_client.py"), *arguments],
        capture_output=True, text=True, env=environment, cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def expected_outputs(model, batch) -> dict:
    with torch.no_grad():
        logits = model(**batch, decoder_input_ids=batch["input_ids"]).logits
    return {"logits": logits, "generated": model.generate(**batch, num_beams=2, max_new_tokens=6)}


def assert_same_outputs(pulled_file: Path, expected: dict) -> None:
    pulled = torch.load(pulled_file)
    torch.testing.assert_close(pulled["logits"], expected["logits"], rtol=0, atol=0)
    assert torch.equal(pulled["generated"], expected["generated"])


def test_push_then_pull_without_hf_attention_gives_identical_outputs(hub, tmp_path):
    model = save_model(tmp_path / "trained")
    pushed = client(hub, tmp_path / "alice", "push", str(tmp_path / "trained"), "alice/tiny-en-de")
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    repo = hub.state.repos["alice/tiny-en-de"]
    files = set(repo.commits[repo.branches["main"]])
    assert {"config.json", "model.safetensors", "configuration_hf_attention.py", "modeling_hf_attention.py"} <= files
    assert {"pipeline_hf_attention.py", "tokenizer.json", "tokenizer_config.json", "README.md"} <= files
    push_routes = hub.called()

    batch = padded_batch([7, 4], max_length=7, vocab_size=model.config.vocab_size)
    torch.save(batch, tmp_path / "batch.pt")
    hub.state.requests.clear()
    sentence = "we buy two dogs"
    consumers = [  # three fresh processes, two at a time: a pull, the pipeline without and with hf_attention
        (tmp_path / "bob", "pull", "alice/tiny-en-de", str(tmp_path / "batch.pt"), str(tmp_path / "o.pt")),
        (tmp_path / "dave", "translate", "alice/tiny-en-de", sentence),
        (tmp_path / "carol", "translate", "alice/tiny-en-de", sentence, "--installed"),
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        pulled, translated, installed = pool.map(lambda arguments: client(hub, *arguments), consumers)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    assert_same_outputs(tmp_path / "o.pt", expected_outputs(model, batch))
    assert {
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/{repo}/preupload/{revision}"),
        ("POST", "/api/models/{repo}/commit/{revision}"),
    } <= push_routes
    assert ("GET", "/{repo}/resolve/{revision}/{file}") in hub.called()

    # The published repo serves the translation pipeline too.
    assert translated.returncode == 0, translated.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "trained")
    expected = []
    for text in (sentence, sentence[::-1]):
        generated = model.generate(**tokenizer(text, return_tensors="pt"), num_beams=2, max_new_tokens=6)
        expected.append({"translation_text": tokenizer.decode(generated[0], skip_special_tokens=True)})
    assert json.loads(translated.stdout.strip().splitlines()[-1]) == expected
    # Where hf_attention is installed, the same call needs no trust_remote_code.
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert json.loads(installed.stdout.strip().splitlines()[-1]) == expected

    # Loading again with HF_HUB_OFFLINE=1 is served from bob's cache alone.
    hub.state.requests.clear()
    offline = client(hub, tmp_path / "bob", "pull", "alice/tiny-en-de", str(tmp_path / "batch.pt"),
                     str(tmp_path / "offline.pt"), offline=True)  # fmt: skip
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert hub.state.requests == []
    assert_same_outputs(tmp_path / "offline.pt", expected_outputs(model, batch))


@pytest.mark.slow  # 19 s
def test_revision_pins_a_commit(hub, tmp_path):
    first = save_model(tmp_path / "v1", seed=1)
    pushed = client(hub, tmp_path / "alice", "push", str(tmp_path / "v1"), "alice/versioned")
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    first_commit = hub.state.repos["alice/versioned"].branches["main"]
    save_model(tmp_path / "v2", seed=2)
    assert client(hub, tmp_path / "alice", "push", str(tmp_path / "v2"), "alice/versioned").returncode == 0
    assert hub.state.repos["alice/versioned"].branches["main"] != first_commit

    batch = padded_batch([5, 3], max_length=5, vocab_size=first.config.vocab_size)
    torch.save(batch, tmp_path / "batch.pt")
    pulled = client(hub, tmp_path / "bob", "pull", "alice/versioned", str(tmp_path / "batch.pt"),
                    str(tmp_path / "v1.pt"), "--revision", first_commit)  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    assert_same_outputs(tmp_path / "v1.pt", expected_outputs(first, batch))

    missing = client(hub, tmp_path / "bob", "pull", "alice/versioned", str(tmp_path / "batch.pt"),
                     str(tmp_path / "x.pt"), "--revision", "no-such-branch")  # fmt: skip
    assert missing.returncode != 0 and "no-such-branch" in missing.stderr and "alice/versioned" in missing.stderr


@pytest.mark.slow  # 13 s
def test_private_repo_needs_the_token(hub, tmp_path):
    model = save_model(tmp_path / "secret")
    pushed = client(hub, tmp_path / "alice", "push", str(tmp_path / "secret"), "alice/private-model", "--private")
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    assert hub.state.repos["alice/private-model"].private
    batch = padded_batch([4], max_length=4, vocab_size=model.config.vocab_size)
    torch.save(batch, tmp_path / "batch.pt")
    anonymous = client(hub, tmp_path / "eve", "pull", "alice/private-model", str(tmp_path / "batch.pt"),
                       str(tmp_path / "e.pt"), token=False)  # fmt: skip
    assert anonymous.returncode != 0 and "alice/private-model" in anonymous.stderr
    assert not (tmp_path / "e.pt").exists()
    granted = client(hub, tmp_path / "bob", "pull", "alice/private-model", str(tmp_path / "batch.pt"),
                     str(tmp_path / "b.pt"))  # fmt: skip
    assert granted.returncode == 0, granted.stderr[-3000:]
    assert_same_outputs(tmp_path / "b.pt", expected_outputs(model, batch))


def test_missing_repo_is_named(hub, tmp_path):
    torch.save(padded_batch([3], max_length=3), tmp_path / "batch.pt")
    result = client(hub, tmp_path / "bob", "pull", "alice/does-not-exist", str(tmp_path / "batch.pt"),
                    str(tmp_path / "o.pt"))  # fmt: skip
    assert result.returncode != 0 and "alice/does-not-exist" in result.stderr


def test_interrupted_download_is_retried_and_never_used_partially(hub, tmp_path):
    model = save_model(tmp_path / "big")
    assert client(hub, tmp_path / "alice", "push", str(tmp_path / "big"), "alice/flaky").returncode == 0
    batch = padded_batch([4], max_length=4, vocab_size=model.config.vocab_size)
    torch.save(batch, tmp_path / "batch.pt")
    hub.state.requests.clear()
    hub.fail_next_download("model.safetensors", after_bytes=1000)  # the connection drops after 1000 bytes
    pulled = client(hub, tmp_path / "bob", "pull", "alice/flaky", str(tmp_path / "batch.pt"), str(tmp_path / "o.pt"))
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    downloads = [path for method, path in hub.state.requests if method == "GET" and path.endswith("model.safetensors")]
    assert len(downloads) >= 2  # the cut transfer was detected and fetched again
    assert_same_outputs(tmp_path / "o.pt", expected_outputs(model, batch))
    assert list((tmp_path / "bob").rglob("*.incomplete")) == []


def trained_folder(folder: Path) -> HfAttentionForConditionalGeneration:
    """What scripts/train.py leaves behind: model, tokenizer, card, curves, results, checkpoints, training_args.bin."""
    model = save_model(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n- de\n---\n# tiny en-de\n")
    (folder / "results.json").write_text('{"bleu_after": 1.0}\n')
    (folder / "training_args.bin").write_bytes(b"pickle")
    (folder / "checkpoint-10").mkdir(parents=True)
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"state")
    return model


def test_publish_dry_run_lists_the_files_and_uploads_nothing(tmp_path, capsys):
    from hf_attention.hub.publishing import main

    trained_folder(tmp_path / "run")
    main(["alice/dry", str(tmp_path / "run"), "--dry_run"])
    listed = capsys.readouterr().out
    assert "would upload" in listed
    for name in ("model.safetensors", "modeling_hf_attention.py", "pipeline_hf_attention.py", "tokenizer.json",
                 "README.md", "results.json"):  # fmt: skip
        assert name in listed
    assert "training_args.bin" not in listed and "checkpoint-10/" not in listed and "optimizer.pt" not in listed
    with pytest.raises(SystemExit):  # the order of `hf upload`: REPO_ID FOLDER
        main([str(tmp_path / "run"), "alice/dry", "--dry_run"])
    assert "the order is REPO_ID FOLDER, as in `hf upload`" in capsys.readouterr().err
    (tmp_path / "run" / "README.md").unlink()
    with pytest.raises(SystemExit, match="has no README.md: it does not hold a model card"):
        main(["alice/dry", str(tmp_path / "run"), "--dry_run"])


def test_publish_script_uploads_one_self_contained_commit(hub, tmp_path):
    model = trained_folder(tmp_path / "run")
    environment = hub_environment(hub, tmp_path / "alice")
    result = subprocess.run(
        [sys.executable, "scripts/push_to_hub.py", "alice/published", str(tmp_path / "run")],
        capture_output=True, text=True, env=environment, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    repo = hub.state.repos["alice/published"]
    assert len(repo.commits) == 2  # the repo's initial commit, then one upload
    files = repo.commits[repo.branches["main"]]
    assert files["README.md"] == (tmp_path / "run" / "README.md").read_bytes()
    assert "training_args.bin" not in files and not any(path.startswith("checkpoint-") for path in files)

    batch = padded_batch([4, 2], max_length=4, vocab_size=model.config.vocab_size)
    torch.save(batch, tmp_path / "batch.pt")
    pulled = client(
        hub, tmp_path / "bob", "pull", "alice/published", str(tmp_path / "batch.pt"), str(tmp_path / "o.pt")
    )
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    assert_same_outputs(tmp_path / "o.pt", expected_outputs(model, batch))


def test_the_training_job_publishes_what_the_publish_script_does(hub, tmp_path):
    """--push_to_hub --hub_model_id --hub_private_repo --hub_token: the finished folder, its card naming the repo, in
    one commit, without checkpoints or pickles; the same files as scripts/push_to_hub.py uploads."""
    environment = hub_environment(hub, tmp_path / "alice", token=False)
    arguments = ["--toy_corpus", "--toy_train_size", "100", "--toy_eval_size", "2", "--vocab_size", "120",
                 "--max_steps", "2", "--save_steps", "1", "--generation_max_length", "4",
                 "--generation_num_beams", "1", "--output_dir", str(tmp_path / "run"), "--push_to_hub",
                 "--hub_model_id", "alice/trained",
                 "--hub_private_repo", "true", "--hub_token", hub.token]  # fmt: skip
    result = subprocess.run([sys.executable, "scripts/train.py", *arguments], capture_output=True, text=True,
                            env=environment, cwd=ROOT, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoint-2").is_dir()  # where transformers users look for them
    repo = hub.state.repos["alice/trained"]
    assert repo.private and len(repo.commits) == 2  # the repo's initial commit, then one upload
    files = repo.commits[repo.branches["main"]]
    card = files["README.md"].decode()
    assert 'from_pretrained("alice/trained"' in card and "fine-tuned version of []" not in card
    assert not any(path.startswith("checkpoint-") or path.endswith((".bin", ".pt", ".pth")) for path in files)

    from hf_attention.hub.publishing import PublishArguments, publish

    script_files = publish(PublishArguments(folder=str(tmp_path / "run"), repo_id="alice/trained", dry_run=True))
    assert sorted(path for path, _ in script_files) == sorted(path for path in files if path != ".gitattributes")


@pytest.mark.slow  # 31 s
def test_corrupted_cache_and_mismatched_config_are_named_with_repo_and_revision(hub, tmp_path):
    model = save_model(tmp_path / "good")
    assert client(hub, tmp_path / "alice", "push", str(tmp_path / "good"), "alice/fragile").returncode == 0
    batch = padded_batch([4], max_length=4, vocab_size=model.config.vocab_size)
    torch.save(batch, tmp_path / "batch.pt")
    assert client(hub, tmp_path / "bob", "pull", "alice/fragile", str(tmp_path / "batch.pt"),
                  str(tmp_path / "o.pt")).returncode == 0  # fmt: skip
    (blob,) = [path.resolve() for path in (tmp_path / "bob").rglob("snapshots/*/model.safetensors")]
    blob.write_bytes(blob.read_bytes()[:500])  # damaged on disk after the download
    damaged = client(hub, tmp_path / "bob", "pull", "alice/fragile", str(tmp_path / "batch.pt"),
                     str(tmp_path / "x.pt"), offline=True)  # fmt: skip
    assert damaged.returncode != 0
    assert "The weights (model.safetensors) of alice/fragile (revision main) cannot be read" in damaged.stderr
    assert "force_download=True" in damaged.stderr

    mismatched = tmp_path / "mismatched"
    save_model(mismatched)
    config = (mismatched / "config.json").read_text().replace('"d_model": 32', '"d_model": 64')
    (mismatched / "config.json").write_text(config)
    assert client(hub, tmp_path / "alice", "push", str(tmp_path / "good"), "alice/mixed").returncode == 0
    # Publish the mismatched files as they are, the way a careless upload would.
    environment = hub_environment(hub, tmp_path / "alice")
    upload = "import sys, huggingface_hub; huggingface_hub.upload_folder(repo_id=sys.argv[1], folder_path=sys.argv[2])"
    assert (
        subprocess.run(
            [sys.executable, "-c", upload, "alice/mixed", str(mismatched)], env=environment, timeout=300
        ).returncode
        == 0
    )
    result = client(hub, tmp_path / "carol", "pull", "alice/mixed", str(tmp_path / "batch.pt"), str(tmp_path / "y.pt"))
    assert result.returncode != 0
    assert "The weights of alice/mixed (revision main) do not match its config.json" in result.stderr
