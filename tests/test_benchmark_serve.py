"""scripts/benchmark_serve.py: three servers driven by concurrent clients in one run, its report and its last line
(`serving throughput at N clients vs unbatched: R.RRx, p99 latency: P ms`)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import require_module

ROOT = Path(__file__).parent.parent


@pytest.mark.slow  # three servers and a soak: ~1 minute
def test_one_run_reports_every_server_and_ends_with_the_throughput_line(tmp_path):
    for module in ("aiohttp", "fastapi", "ctranslate2"):
        require_module(module)
    command = [sys.executable, "scripts/benchmark_serve.py", "--preset", "tiny", "--vocab_size", "300",
               "--max_new_tokens", "4", "--requests", "12", "--rounds", "1", "--clients", "1,4", "--soak", "40",
               "--json", str(tmp_path / "figures.json")]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"serving throughput at 4 clients vs unbatched: \d+\.\d\dx, p99 latency: \d+ ms", lines[-1])
    assert any(line.startswith("soak: 40 requests at 4 clients, 0 lost") for line in lines)
    results = json.loads((tmp_path / "figures.json").read_text())["results"]
    assert {"batched", "unbatched", "ct2", "soak"} <= set(results)
    for name in ("batched", "unbatched", "ct2"):
        assert all(results[name][str(clients)]["lost"] == 0 for clients in (1, 4))
