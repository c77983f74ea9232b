"""BLEU/chrF through the local evaluate modules (offline), compute_metrics for Seq2SeqTrainer, scripts/evaluate.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
from transformers import EvalPrediction

from hf_attention.data import toy_translation_corpus
from hf_attention.inference.evaluate import main
from hf_attention.metrics.evaluation import build_compute_metrics, load_metric, score_translations

from .helpers import toy_tokenizer

PREDICTIONS = ["the cat sat on the mat", "a dog runs in the park", "hello"]
REFERENCES = ["the cat sat on a mat", "a dog is running in the park", "hello there"]


def test_local_metrics_load_offline_and_equal_sacrebleu(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bleu = load_metric("sacrebleu").compute(predictions=PREDICTIONS, references=[[r] for r in REFERENCES])
    chrf = load_metric("chrf").compute(predictions=PREDICTIONS, references=REFERENCES)
    assert bleu["score"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score)
    assert chrf["score"] == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score)
    assert bleu["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert chrf["signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")


def test_metric_modules_load_in_a_fresh_offline_cache(tmp_path):
    """evaluate copies each module and its shared helper into its own cache, with no network."""
    script = (
        "import evaluate; from hf_attention.evaluation import METRICS_DIR; "
        "chrf = evaluate.load(str(METRICS_DIR / 'chrf.py')); "
        "print(chrf.compute(predictions=['a b'], references=[['a b']])['score'])"
    )
    environment = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(100.0)
    assert list((tmp_path / "home").rglob("sacrebleu_inputs.py"))


def test_scores_and_signatures_together():
    scores = score_translations(PREDICTIONS, REFERENCES)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score)
    assert score_translations(REFERENCES, REFERENCES)["bleu"] == pytest.approx(100)
    assert "version:" in scores["bleu_signature"] and "nc:6" in scores["chrf_signature"]
    capitalised = score_translations([text.capitalize() for text in PREDICTIONS], REFERENCES)
    assert capitalised["bleu_lowercase"] == pytest.approx(scores["bleu"])  # case no longer counts...
    assert capitalised["bleu"] < capitalised["bleu_lowercase"]  # ...where the cased score sees it
    assert "case:lc" in scores["bleu_lowercase_signature"] and "case:mixed" in scores["bleu_signature"]
    with pytest.raises(ValueError, match="2 translations for 3 references"):
        score_translations(PREDICTIONS[:2], REFERENCES)
    with pytest.raises(ValueError, match=r"No local metric 'rouge'; choose one of \['chrf', 'sacrebleu'\]"):
        load_metric("rouge")
    with pytest.raises(ValueError, match="the same number of references for every prediction"):
        load_metric("sacrebleu").compute(predictions=PREDICTIONS[:2], references=[["a", "b"], ["c"]])


def test_compute_metrics_decodes_generations_and_minus_100_padded_labels():
    tokenizer = toy_tokenizer()
    targets = ["wir kaufen vier hunde", "ich sehe zwei katzen"]
    encoded = tokenizer(targets, padding=True)["input_ids"]
    labels = np.where(np.array(tokenizer(targets, padding=True)["attention_mask"]) == 1, encoded, -100)
    generated = np.array(encoded)
    generated[1, :] = tokenizer.pad_token_id  # an empty translation
    generated[1, 0] = -100
    metrics = build_compute_metrics(tokenizer)(EvalPrediction(predictions=generated, label_ids=labels))
    expected = sacrebleu.corpus_bleu([targets[0], ""], [targets])
    assert metrics["bleu"] == pytest.approx(expected.score) and 0 < metrics["chrf"] < 100


def test_evaluate_script_writes_a_json_report(tmp_path, capsys):
    from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration

    tokenizer = toy_tokenizer()
    config = HfAttentionConfig.from_preset("tiny", vocab_size=len(tokenizer), d_model=32, encoder_ffn_dim=64)
    HfAttentionForConditionalGeneration(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = toy_translation_corpus(6, seed=5)
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    report_file = tmp_path / "report" / "scores.json"
    main(["--model_dir", str(tmp_path / "model"), "--test_file", str(tmp_path / "test.jsonl"),
          "--output_file", str(report_file), "--num_beams", "2", "--max_new_tokens", "8"])  # fmt: skip
    report = json.loads(report_file.read_text())
    assert report["sentences"] == 6 and report["pair"] == "en-de" and report["num_beams"] == 2
    assert 0 <= report["bleu"] <= 100 and report["bleu_signature"].startswith("nrefs:1")
    assert report["bleu_lowercase_signature"].startswith("nrefs:1|case:lc") and 0 <= report["bleu_lowercase"] <= 100
    assert report["examples"][0]["reference"] == rows[0]["translation"]["de"]
    hypotheses = (tmp_path / "report" / "scores.translations.txt").read_text().splitlines()  # every one, in order
    assert len(hypotheses) == 6 and hypotheses[:5] == [example["translation"] for example in report["examples"]]
    with pytest.raises(SystemExit, match="missing.jsonl: no such file"):
        main(["--model_dir", str(tmp_path / "model"), "--test_file", str(tmp_path / "missing.jsonl")])

    # The decoding the measurements compare: both length penalties, and MBR (its samples follow the seed).
    from hf_attention.inference.translate import main as translate

    (tmp_path / "test.en").write_text("".join(row["translation"]["en"] + "\n" for row in rows))
    for options in (["--num_beams", "2", "--length_penalty_style", "gnmt"], ["--mbr", "3", "--seed", "1"]):
        common = ["--max_new_tokens", "8", "--batch_size", "2", *options]
        main(["--model_dir", str(tmp_path / "model"), "--test_file", str(tmp_path / "test.jsonl"), "--output_file",
              str(report_file), *common])  # fmt: skip
        translate(["--model", str(tmp_path / "model"), "--input", str(tmp_path / "test.en"), "--output",
                   str(tmp_path / "out.de"), "--quantization", "none", *common])  # fmt: skip
        evaluated = (tmp_path / "report" / "scores.translations.txt").read_text()
        assert evaluated == (tmp_path / "out.de").read_text()  # the scored translations are translate.py's
    mbr_report = json.loads(report_file.read_text())
    assert (mbr_report["mbr"], mbr_report["num_beams"]) == ("3 samples, chrf", 1)  # sampled, not beam-searched


def test_translations_stop_at_twice_the_source_length_plus_ten():
    import torch

    from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration
    from hf_attention.metrics.evaluation import translate

    tokenizer = toy_tokenizer()
    torch.manual_seed(0)
    model = HfAttentionForConditionalGeneration(HfAttentionConfig.from_preset("tiny", vocab_size=len(tokenizer)))
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = -10.0  # an untrained model that never stops by itself
    source = "we buy two dogs"
    source_length = len(tokenizer(source)["input_ids"])
    (translation,) = translate(model, tokenizer, [source], num_beams=2, max_new_tokens=500)
    assert len(tokenizer(translation, add_special_tokens=False)["input_ids"]) <= 2 * source_length + 10
    (short,) = translate(model, tokenizer, [source], num_beams=1, max_new_tokens=3)
    assert len(tokenizer(short, add_special_tokens=False)["input_ids"]) <= 3
