"""scripts/benchmark_generate.py: the engines side by side in one run, its last lines (`WORKLOAD: R.RRx Marian`),
its JSON, and no files left behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import require_module

ROOT = Path(__file__).parent.parent
TINY_RUN = ["--preset", "tiny", "--vocab_size", "200", "--source_length", "8", "--new_tokens", "4", "--rounds", "1"]


def benchmark(*arguments: str, temporary: Path) -> subprocess.CompletedProcess:
    environment = dict(os.environ, TMPDIR=str(temporary))  # where the CTranslate2 exports go
    command = [sys.executable, "scripts/benchmark_generate.py", *TINY_RUN, *arguments]
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)


@pytest.mark.slow  # 23 s; the auto-engine run below checks the last lines
def test_one_run_ends_with_a_line_per_workload_and_leaves_no_export_behind(tmp_path):
    require_module("ctranslate2")
    (tmp_path / "exports").mkdir()
    result = benchmark("--engines", "marian,fp32,int8,ct2-int8", "--workloads", "greedy_b1,beam4_b16",
                       "--json", str(tmp_path / "figures.json"), temporary=tmp_path / "exports")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-2:]
    for line, workload in zip(last, ("greedy_b1", "beam4_b16"), strict=True):
        assert line.startswith(f"{workload}: ") and " Marian (" in line and ", ct2-int8 " in line, line
    figures = json.loads((tmp_path / "figures.json").read_text())["figures"]
    assert set(figures) == {"marian", "fp32", "int8", "ct2-int8"}
    assert all(set(figure["seconds"]) == {"greedy_b1", "beam4_b16"} for figure in figures.values())
    assert all(figure["peak_memory_mb"] > 0 for figure in figures.values())
    assert list((tmp_path / "exports").iterdir()) == []


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--engines", "marian,ct2-int8"], "--engines marian,ct2-int8: give marian, one or more of fp32"),
        (["--engines", "fp32"], "--engines fp32: give marian"),
        (["--engines", "marian,fp16"], "--engines marian,fp16: give marian"),
        (["--workloads", "greedy_b2"], "--workloads 'greedy_b2': must be among greedy_b1"),
    ],
)
def test_bad_engines_and_workloads_are_refused_in_one_line(tmp_path, arguments, message):
    result = benchmark(*arguments, temporary=tmp_path)
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr


def test_the_auto_engine_reports_the_choice_made_for_each_workload(tmp_path):
    """With HF_ATTENTION_CPU_CAPABILITY=avx2, every machine chooses as an AVX2 one: eager int8 for beam search."""
    environment = dict(os.environ, TMPDIR=str(tmp_path), HF_ATTENTION_CPU_CAPABILITY="avx2")
    command = [sys.executable, "scripts/benchmark_generate.py", *TINY_RUN, "--engines", "marian,auto", "--workloads",
               "beam4_b16", "--json", str(tmp_path / "figures.json")]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = result.stdout.splitlines()[0], result.stdout.strip().splitlines()[-1]
    assert first.startswith("CPU: ") and "(avx2" in first  # the capability map, masked
    assert last.startswith("beam4_b16: ") and ", auto " in last and "(int8 (dynamic int8 kernels))" in last, last
    figures = json.loads((tmp_path / "figures.json").read_text())["figures"]
    assert figures["auto"]["choices"] == {"beam4_b16": "int8 (dynamic int8 kernels)"}
