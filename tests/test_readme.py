"""The README's set-up commands and Python example, and the docstring examples, run as written."""

import doctest
import re
from pathlib import Path

import pytest

import hf_attention.configuration_hf_attention
import hf_attention.modeling_hf_attention

README = Path(__file__).parent.parent / "README.md"


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


@pytest.mark.parametrize("module", [hf_attention.configuration_hf_attention, hf_attention.modeling_hf_attention])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
