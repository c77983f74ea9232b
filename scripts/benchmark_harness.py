"""The benchmarks' one worker harness: every measurement runs in a fresh process, engines alternate round by round,
and the figures are medians (`benchmark_data.py`, `benchmark_generate.py`, `benchmark_training.py` use it).

A fresh process per measurement keeps one engine's allocator, thread pools and compiled kernels from warming or
crowding the next; alternating rounds spread a shared machine's noise over every engine alike.
"""

import json
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def arguments_as_flags(args: object, leave_out: Iterable[str] = ()) -> list[str]:
    """A benchmark's argument dataclass as the command-line flags that rebuild it in a worker (empty ones left out)."""
    flags = []
    for name, value in asdict(args).items():
        if name not in leave_out and value not in ("", None):
            flags += [f"--{name}", str(value)]
    return flags


def run_worker(script: str, flags: Sequence[str], what: str, cwd: Path | None = None) -> dict:
    """Run `python SCRIPT FLAGS` (in `cwd`, default ours) and return the JSON its worker printed last.

    Raises:
        SystemExit: the worker failed; the message names `what` and ends with its stderr.
    """
    result = subprocess.run([sys.executable, script, *flags], capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        sys.exit(f"error: the {what} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_worker_result(figures: dict) -> None:
    """A worker's answer: one JSON line, the last on stdout (what `run_worker` reads)."""
    print(json.dumps(figures))


def interleaved_rounds(names: Sequence[str], rounds: int, measure: Callable[[str], dict]) -> dict[str, list[dict]]:
    """`measure(name)` for every name, `rounds` times; every other round runs the names in reverse order, so no
    engine always follows the same neighbour."""
    measurements = {name: [] for name in names}
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            measurements[name].append(measure(name))
    return measurements


def median_of(measurements: Sequence[dict], key: str) -> float:
    """The median of one figure over rounds."""
    return statistics.median(measurement[key] for measurement in measurements)
