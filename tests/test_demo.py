"""The main job end to end, on a small budget: it learns, saves a loadable model, and guards its output folder."""

import pytest
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from hf_attention import HfAttentionForConditionalGeneration
from hf_attention.demo import main


def test_demo_trains_saves_and_translates(tmp_path, capsys):
    main(["--output_dir", str(tmp_path / "run"), "--train_size", "2000", "--test_size", "20", "--max_steps", "60"])
    printed = capsys.readouterr().out
    assert "exact-match on 20 held-out sentences" in printed
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run")
    assert isinstance(model, HfAttentionForConditionalGeneration)
    assert AutoTokenizer.from_pretrained(tmp_path / "run").pad_token_id == model.config.pad_token_id


def test_demo_refuses_to_overwrite_a_folder_without_the_flag(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit, match="--overwrite_output_dir"):
        main(["--output_dir", str(tmp_path)])
    assert (tmp_path / "keep.txt").read_text() == "precious"
