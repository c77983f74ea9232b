"""The README's set-up commands and Python example, the docs' Python examples and the docstring examples run as
written."""

import doctest
import re
from pathlib import Path

import pytest

import hf_attention.configuration_hf_attention
import hf_attention.modeling_hf_attention

from .helpers import require_module

README = Path(__file__).parent.parent / "README.md"
DOCS = sorted((README.parent / "docs").glob("*.md"))


def test_readme_opens_with_exactly_two_commands_whose_scripts_exist():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S)
    commands = [line.split("#")[0].strip() for line in first_block.group(1).strip().splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert README.read_text().index("```bash") < README.read_text().index("```python")
    for command in commands:
        assert (README.parent / command.split()[1]).exists()


def test_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    assert namespace["out"].shape[0] == 2 and namespace["out"].shape[1] <= 41
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.fixture
def trained_run(tmp_path, monkeypatch):
    """A working directory holding `runs/en-de`, a model and tokenizer as the training job writes them (tiny)."""
    from transformers import GenerationConfig

    from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration

    from .helpers import toy_tokenizer

    tokenizer = toy_tokenizer()
    special = {name: getattr(tokenizer, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    config = HfAttentionConfig.from_preset("tiny", vocab_size=len(tokenizer), decoder_start_token_id=1, **special)
    model = HfAttentionForConditionalGeneration(config)
    model.generation_config = GenerationConfig(num_beams=4, max_new_tokens=20, decoder_start_token_id=1, **special)
    model.save_pretrained(tmp_path / "runs" / "en-de")
    tokenizer.save_pretrained(tmp_path / "runs" / "en-de")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "page", [page for page in DOCS if "```python" in page.read_text()], ids=lambda page: page.name
)
def test_the_docs_python_examples_run(page, trained_run):
    require_module("ctranslate2")
    require_module("onnxruntime")
    for example in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
        exec(compile(example, str(page), "exec"), {})


@pytest.mark.parametrize("module", [hf_attention.configuration_hf_attention, hf_attention.modeling_hf_attention])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
