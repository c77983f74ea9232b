"""scripts/translate.py: length-sorted batches written back in input order, the torch and ctranslate2 engines giving
the same translations, stdin/stdout, and bad input refused in one line with nothing written."""

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from hf_attention.inference.translate import length_sorted_batches, main

from .helpers import generate_alone, require_module, save_toy_translation_model, with_capabilities

ROOT = Path(__file__).parent.parent
SOURCES = ["we buy two dogs", "they sell ninety one trees and five houses", "i see cats", "you count three hundred"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_toy_translation_model(tmp_path_factory.mktemp("model"))


def one_by_one(model_dir: Path, num_beams: int) -> list[str]:
    """Each sentence alone; at most 12 new tokens, under every batch's own limit (2 × its longest source + 10)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    outputs = []
    for sentence in SOURCES:
        batch = tokenizer([sentence], return_tensors="pt")
        generated = model.generate(**batch, num_beams=num_beams, max_new_tokens=12, max_length=None)
        outputs.append(tokenizer.decode(generated[0], skip_special_tokens=True).strip())
    return outputs


def test_batches_are_sorted_by_length_and_bounded():
    lengths = [3, 9, 1, 7, 5]
    assert length_sorted_batches(lengths, batch_size=2) == [[1, 3], [4, 0], [2]]
    by_tokens = length_sorted_batches(lengths, batch_size=99, max_tokens=14)
    assert by_tokens == [[1], [3, 4], [0, 2]] and all(len(b) * lengths[b[0]] <= 14 for b in by_tokens)


@pytest.mark.parametrize("batching", [["--batch_size", "2"], ["--max_tokens", "20"]], ids=["sentences", "tokens"])
def test_translations_come_out_in_input_order_as_generate_gives_them(tmp_path, model_dir, batching, capsys):
    source = tmp_path / "source.txt"
    source.write_text("".join(f"{line}\n" for line in SOURCES), encoding="utf-8")
    output = tmp_path / "out.txt"
    main(["--model", str(model_dir), "--input", str(source), "--output", str(output), "--num_beams", "2",
          "--max_new_tokens", "12", "--quantization", "none", *batching])  # fmt: skip
    assert output.read_text(encoding="utf-8").splitlines() == one_by_one(model_dir, num_beams=2)
    assert "translated 4 sentences" in capsys.readouterr().err


def test_the_ctranslate2_engine_translates_as_the_torch_engine(tmp_path, model_dir, monkeypatch):
    require_module("ctranslate2")
    (tmp_path / "temporary").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temporary"))  # where the export of the model goes
    source = tmp_path / "source.txt"
    source.write_text("".join(f"{line}\n" for line in SOURCES), encoding="utf-8")
    outputs = {}
    for engine in ("torch", "ctranslate2"):
        outputs[engine] = tmp_path / f"{engine}.txt"
        main(["--model", str(model_dir), "--input", str(source), "--output", str(outputs[engine]), "--engine", engine,
              "--num_beams", "4", "--batch_size", "3", "--quantization", "none"])  # fmt: skip
    assert outputs["ctranslate2"].read_text() == outputs["torch"].read_text()
    assert list((tmp_path / "temporary").iterdir()) == []  # the export was deleted once loaded
    int8 = tmp_path / "int8.txt"
    main(["--model", str(model_dir), "--input", str(source), "--output", str(int8), "--quantization", "int8"])
    assert len(int8.read_text().splitlines()) == len(SOURCES)


@pytest.mark.parametrize(
    "cpu_class, arguments, setting",
    [
        ("avx2", [], "int8"),
        ("amx", ["--batch_size", "16", "--num_beams", "4"], "bfloat16"),
        ("avx512-bf16", ["--batch_size", "16", "--num_beams", "4"], "int8"),
        ("avx2", ["--quantization", "none"], "float32"),
        ("avx2", ["--dtype", "bfloat16"], "bfloat16"),  # a dtype asked for is the user's precision
    ],
)
def test_the_default_quantization_is_the_machines_choice_for_the_workload(
    tmp_path, model_dir, monkeypatch, capsys, cpu_class, arguments, setting
):
    with_capabilities(monkeypatch, cpu_class)
    source, output = tmp_path / "source.txt", tmp_path / "out.txt"
    source.write_text("".join(f"{line}\n" for line in SOURCES), encoding="utf-8")
    main(["--model", str(model_dir), "--input", str(source), "--output", str(output), "--max_new_tokens", "12",
          "--progress", "false", *arguments])  # fmt: skip
    log = capsys.readouterr().err
    assert f"(torch, {setting}, cpu)" in log and f"{cpu_class} CPU (faked)" in log
    assert len(output.read_text().splitlines()) == len(SOURCES)


def test_the_ctranslate2_engine_decodes_with_the_generation_config_s_beams_and_length_penalty(tmp_path, model_dir):
    """The paper's α = 0.6 (the training job saves it): without it, CTranslate2 scored 37.50 BLEU on Multi30k where
    generate() scores 37.73."""
    require_module("ctranslate2")
    from transformers import GenerationConfig

    from hf_attention import export_ctranslate2
    from hf_attention.inference.translate import load_engine

    exported = export_ctranslate2(model_dir, tmp_path / "ct2")
    GenerationConfig(num_beams=3, length_penalty=0.6).save_pretrained(exported)
    engine = load_engine("ctranslate2", str(exported))
    assert (engine.num_beams, engine.length_penalty) == (3, 0.6)
    calls, translator = [], engine.translator

    class SpyTranslator:
        def translate_batch(self, *args, **kwargs):
            calls.append(kwargs)
            return translator.translate_batch(*args, **kwargs)

    engine.translator = SpyTranslator()
    assert len(engine.translate(SOURCES[:2])) == 2
    assert calls[0]["length_penalty"] == 0.6 and calls[0]["beam_size"] == 3
    assert load_engine("ctranslate2", str(exported), num_beams=5).num_beams == 5


def test_stdin_to_stdout_through_the_script(model_dir):
    result = subprocess.run(
        [sys.executable, "scripts/translate.py", "--model", str(model_dir), "--num_beams", "2", "--max_new_tokens",
         "12", "--progress", "false", "--quantization", "none"],
        cwd=ROOT, input="\n".join(SOURCES) + "\n", capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == one_by_one(model_dir, num_beams=2)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--engine", "onnxruntime"], "--engine onnxruntime: must be one of torch, ctranslate2"),
        (["--quantization", "int4"], "--quantization int4: the torch engine offers auto, int8 and bf16"),
        (["--device", "cuda"], "--device cuda: this machine has no CUDA device"),
        (["--batch_size", "0"], "--batch_size 0: must be a positive integer"),
        (["--engine", "ctranslate2", "--compile", "true"], "--compile: compiles the torch engine's decoding step"),
        (["--num_beams", "2", "--n_best", "3"], "--n_best 3: more than --num_beams 2"),
        (["--n_best", "5"], "--n_best 5: more than the model's 1 beams"),
        (["--output_format", "xml"], "--output_format xml: must be one of text, jsonl"),
        (["--token_scores", "true"], "--token_scores: per-token scores are written with --output_format jsonl"),
        (["--score_targets", "source.txt", "--engine", "ctranslate2"], "--score_targets: scores tokens with the"),
        (["--score_targets", "two_lines.txt"], "two_lines.txt: 2 lines for 1 in --input"),
        (["--top_k", "5"], "--top_k 5: a sampling option; give --do_sample or --mbr N"),
        (["--do_sample", "true", "--top_p", "1.5"], "--top_p 1.5: must be between 0 and 1"),
        (["--mbr", "1"], "--mbr 1: the number of samples to choose from must be 2 or more"),
        (["--mbr", "4", "--num_beams", "4"], "--num_beams 4: sampling and --mbr draw one sample at a time"),
        (["--mbr", "4", "--mbr_metric", "ter"], "--mbr_metric ter: must be one of chrf, bleu"),
        (["--length_penalty_style", "wu"], "--length_penalty_style wu: must be one of transformers, gnmt"),
        (["--target_prefix", "two_lines.txt"], "two_lines.txt: 2 lines for 1 in --input; give one start per"),
        (["--target_prefix", "source.txt", "--engine", "onnx"], "--target_prefix: the onnx graphs decode one token"),
        (["--target_prefix", "missing.txt"], "--target_prefix .*missing.txt: No such file"),
        (["--engine", "ctranslate2", "--length_penalty_style", "gnmt"], "CTranslate2 divides by length"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(tmp_path, model_dir, extra, message):
    if extra[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    source, output = tmp_path / "source.txt", tmp_path / "out.txt"
    source.write_text("we buy two dogs\n")
    (tmp_path / "two_lines.txt").write_text("wir\nkaufen\n")
    output.write_text("earlier translations\n")
    extra = [str(tmp_path / name) if name.endswith(".txt") else name for name in extra]
    with pytest.raises(SystemExit, match=message):
        main(["--model", str(model_dir), "--input", str(source), "--output", str(output), *extra])
    assert output.read_text() == "earlier translations\n"


def test_a_line_that_is_not_utf8_is_named(tmp_path, model_dir):
    source = tmp_path / "source.txt"
    source.write_bytes(b"we buy two dogs\nthey sell \xff trees\n")
    with pytest.raises(SystemExit, match=rf"--input {source}: line 2 is not UTF-8 \(byte 0xff at column 11\)"):
        main(["--model", str(model_dir), "--input", str(source), "--output", str(tmp_path / "out.txt")])
    assert not (tmp_path / "out.txt").exists()


def test_n_best_lists_and_scores_are_generate_s_in_the_documented_layouts(tmp_path, model_dir):
    source = tmp_path / "source.txt"
    source.write_text("".join(f"{line}\n" for line in SOURCES[:2]), encoding="utf-8")
    common = ["--model", str(model_dir), "--input", str(source), "--num_beams", "3", "--max_new_tokens", "12",
              "--quantization", "none", "--progress", "false"]  # fmt: skip
    main([*common, "--n_best", "2", "--output", str(tmp_path / "n_best.tsv")])
    main([*common, "--n_best", "2", "--output_format", "jsonl", "--token_scores", "true",
          "--output", str(tmp_path / "n_best.jsonl")])  # fmt: skip
    tsv = [line.split("\t") for line in (tmp_path / "n_best.tsv").read_text(encoding="utf-8").splitlines()]
    records = [json.loads(line) for line in (tmp_path / "n_best.jsonl").read_text(encoding="utf-8").splitlines()]
    for index, sentence in enumerate(SOURCES[:2]):
        expected = generate_alone(model_dir, sentence, num_beams=3, n_best=2)
        rows = [(text, float(value)) for number, value, text in tsv if int(number) == index]
        assert [text for text, _ in rows] == [text for text, _ in expected]
        assert [value for _, value in rows] == pytest.approx([value for _, value in expected], abs=1e-5)
        record = records[index]
        assert record["translation"] == expected[0][0] and len(record["hypotheses"]) == 2
        for hypothesis, (text, value) in zip(record["hypotheses"], expected, strict=True):
            assert hypothesis["text"] == text and hypothesis["score"] == pytest.approx(value, abs=1e-5)
            assert len(hypothesis["tokens"]) == len(hypothesis["token_scores"]) > 0


def test_scoring_a_translation_sums_the_log_probabilities_generate_chose(tmp_path, model_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from hf_attention import score

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(SOURCES, return_tensors="pt", padding=True)
    output = model.generate(**batch, max_new_tokens=12, return_dict_in_generate=True, output_scores=True)
    steps = model.compute_transition_scores(output.sequences, output.scores, normalize_logits=True)
    ids = [[t for t in row[1:] if t != tokenizer.pad_token_id] for row in output.sequences.tolist()]
    scored = score(model, tokenizer, SOURCES, ids, batch_size=3)
    for row, found in enumerate(scored):
        chosen = steps[row, : len(ids[row])]
        assert found.token_scores == pytest.approx(chosen.tolist(), abs=1e-4)
        assert found.total == pytest.approx(chosen.sum().item(), abs=1e-4)
    # text targets through the script: a total per line, the log-probability of the target with its end token
    source, targets, output_file = tmp_path / "source.txt", tmp_path / "targets.txt", tmp_path / "scores.txt"
    source.write_text("".join(f"{line}\n" for line in SOURCES), encoding="utf-8")
    targets.write_text("wir kaufen zwei hunde\n" * len(SOURCES), encoding="utf-8")
    main(["--model", str(model_dir), "--input", str(source), "--score_targets", str(targets), "--output",
          str(output_file), "--quantization", "none", "--progress", "false"])  # fmt: skip
    totals = [float(line) for line in output_file.read_text().splitlines()]
    expected = score(model, tokenizer, SOURCES, ["wir kaufen zwei hunde"] * len(SOURCES))
    assert totals == pytest.approx([found.total for found in expected], abs=1e-5)
    assert all(found.tokens[-1] == tokenizer.eos_token for found in expected)


def test_samples_and_mbr_from_the_command_line_are_generate_s_after_the_same_seed(tmp_path, model_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, set_seed

    from hf_attention.inference.mbr import mbr_select

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def samples(count: int) -> list[str]:
        set_seed(3)
        generated = model.generate(**tokenizer([SOURCES[1]], return_tensors="pt"), do_sample=True, top_k=5,
                                   num_return_sequences=count, max_new_tokens=12)  # fmt: skip
        return [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]

    source, output = tmp_path / "source.txt", tmp_path / "out.jsonl"
    source.write_text(SOURCES[1] + "\n", encoding="utf-8")
    common = ["--model", str(model_dir), "--input", str(source), "--output", str(output), "--max_new_tokens", "12",
              "--quantization", "none", "--progress", "false", "--top_k", "5", "--seed", "3"]  # fmt: skip
    main([*common, "--do_sample", "true", "--n_best", "3", "--output_format", "jsonl"])
    (record,) = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [hypothesis["text"] for hypothesis in record["hypotheses"]] == samples(3)
    main([*common, "--mbr", "4"])
    drawn = samples(4)
    assert output.read_text(encoding="utf-8") == drawn[mbr_select(drawn)] + "\n"


def test_mbr_keeps_the_candidate_with_the_highest_summed_utility():
    from sacrebleu.metrics import CHRF

    from hf_attention.inference.mbr import mbr_select

    candidates = ["a dog runs in the park", "a dog is running in a park", "the cat sleeps", "a dog runs in a park"]
    chrf = CHRF()
    utilities = [sum(chrf.sentence_score(c, [o]).score for o in candidates if o is not c) for c in candidates]
    assert mbr_select(candidates) == max(range(4), key=utilities.__getitem__) != 2  # never the outlier
    assert mbr_select(["same", "same", "other"], metric="bleu") == 0
    with pytest.raises(ValueError, match="--mbr_metric ter: must be one of chrf, bleu"):
        mbr_select(candidates, metric="ter")


def test_the_length_penalty_style_reaches_beam_search(tmp_path, model_dir):
    source = tmp_path / "source.txt"
    source.write_text("".join(f"{line}\n" for line in SOURCES), encoding="utf-8")
    scores = {}
    for style in ("transformers", "gnmt"):
        output = tmp_path / f"{style}.tsv"
        main(["--model", str(model_dir), "--input", str(source), "--output", str(output), "--num_beams", "3",
              "--scores", "true", "--max_new_tokens", "12", "--quantization", "none", "--progress", "false",
              "--length_penalty_style", style])  # fmt: skip
        scores[style] = [float(line.split("\t")[1]) for line in output.read_text(encoding="utf-8").splitlines()]
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for index, sentence in enumerate(SOURCES):
        batch = tokenizer([sentence], return_tensors="pt")
        expected = model.generate(**batch, num_beams=3, max_new_tokens=12, length_penalty_style="gnmt",
                                  return_dict_in_generate=True, output_scores=True)  # fmt: skip
        assert scores["gnmt"][index] == pytest.approx(expected.sequences_scores.item(), abs=1e-5)
    assert scores["gnmt"] != pytest.approx(scores["transformers"])


@pytest.mark.parametrize("num_beams", [1, 3])
def test_translations_continue_their_target_prefix_in_torch_and_ctranslate2(tmp_path, model_dir, num_beams):
    """Autocompletion: each line's translation continues its prefix, as `generate(decoder_input_ids=...)` does
    alone; CTranslate2's `target_prefix` gives the same translations."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    starts = ["wir kaufen", "", "ich", "sie zählen drei"]
    source, prefix = tmp_path / "source.txt", tmp_path / "prefix.txt"
    source.write_text("".join(f"{line}\n" for line in SOURCES), encoding="utf-8")
    prefix.write_text("".join(f"{line}\n" for line in starts), encoding="utf-8")
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected = []
    for sentence, start in zip(SOURCES, starts, strict=True):
        ids = tokenizer(text_target=start, add_special_tokens=False)["input_ids"] if start else []
        decoder_input_ids = torch.tensor([[model.generation_config.decoder_start_token_id, *ids]])
        generated = model.generate(**tokenizer([sentence], return_tensors="pt"), decoder_input_ids=decoder_input_ids,
                                   num_beams=num_beams, max_new_tokens=12)  # fmt: skip
        expected.append(tokenizer.decode(generated[0], skip_special_tokens=True).strip())
    engines = ["torch", "ctranslate2"] if importlib.util.find_spec("ctranslate2") else ["torch"]
    for engine in engines:
        output = tmp_path / f"{engine}.txt"
        main(["--model", str(model_dir), "--input", str(source), "--target_prefix", str(prefix), "--output",
              str(output), "--num_beams", str(num_beams), "--max_new_tokens", "12", "--quantization", "none",
              "--progress", "false", "--engine", engine])  # fmt: skip
        assert output.read_text(encoding="utf-8").splitlines() == expected, engine
    assert expected[0].startswith("wir kaufen") and expected[2].startswith("ich")
