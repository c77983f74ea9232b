"""Draws docs/multi30k_bleu_vs_time.png: validation BLEU against wall-clock minutes for the runs of docs/multi30k.md.

    python docs/plot_multi30k.py [RUN_FOLDER[=MINUTES] ...]   # checkpoint-*/trainer_state.json (wall_seconds)
    python docs/plot_multi30k.py --figure docs/multi30k_fp32_ab.png RUN_FOLDER ...   # only these runs, elsewhere

`=MINUTES` adds the minutes a run spent before training where its `wall_seconds` count from the training start
(runs made before the job counted from its own start). Runs made before the training job logged `wall_seconds` are
given below as measured (minutes read off each log).
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (wall-clock minutes since the command started, validation BLEU on 200 sentences, beam 4), read off the logs.
MEASURED = {
    "stop 7: fp32, batch 64": [(1.5, 0.0), (10.7, 9.5), (19.8, 12.3), (29.0, 14.0), (38.2, 19.1), (47.4, 23.2)],
    "r1: bf16 + length groups, batch 128, dropout 0.2 (stopped)": [(1.5, 0.0), (17.0, 10.0)],
    "r2: bf16 + length groups, batch 64 (stopped)": [(1.5, 0.0), (9.0, 3.8), (17.0, 6.1)],
}


def run_curve(run: Path, offset_minutes: float) -> list[tuple[float, float]]:
    found = [*run.glob("checkpoint-*/trainer_state.json"), *run.glob("checkpoints/checkpoint-*/trainer_state.json")]
    states = sorted(found, key=lambda p: int(p.parent.name[11:]))
    history = json.loads(states[-1].read_text())["log_history"]
    return [
        (offset_minutes + e["wall_seconds"] / 60, e["eval_bleu"])
        for e in history
        if "eval_bleu" in e and "wall_seconds" in e
    ]


def main() -> None:
    arguments, figure_file = sys.argv[1:], Path(__file__).with_name("multi30k_bleu_vs_time.png")
    if arguments[:1] == ["--figure"]:  # a figure of the named runs alone (an A/B), not the history
        figure_file, arguments, history = Path(arguments[1]), arguments[2:], {}
    else:
        history = MEASURED
    curves, finals = dict(history), {}
    for argument in arguments:
        folder, _, offset = argument.partition("=")
        curves[Path(folder).name] = run_curve(Path(folder), float(offset or 0))
        results = Path(folder) / "results.json"
        if results.is_file():  # the run's test BLEU, at the minute the whole job ended
            summary = json.loads(results.read_text())
            finals[Path(folder).name] = (summary["seconds"] / 60 + float(offset or 0), summary["bleu_after"])
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for label, points in curves.items():
        line = axes.plot(*zip(*points, strict=True), "o-", label=label)[0]
        if label in finals:
            axes.plot(*finals[label], "*", markersize=14, color=line.get_color(), label=f"{label}: test BLEU, end")
    axes.axhline(35, color="grey", linestyle=":", label="the goal: 35 BLEU (test set)")
    axes.axvline(60, color="grey", linestyle="--", linewidth=0.8)
    axes.set(xlabel="wall-clock minutes on 2 CPU cores", ylabel="validation BLEU (200 sentences, beam 4)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(figure_file, dpi=100)


if __name__ == "__main__":
    main()
