"""Loss and BLEU curves of a training run, from `Trainer.state.log_history`, as one PNG."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(log_history: list[dict], path: str | Path) -> Path:
    """Left: training and validation loss per step. Right: validation BLEU and chrF per step (step 0 is before
    training when the run evaluated on start)."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [entry for entry in log_history if "eval_loss" in entry]
    figure, (loss_axes, score_axes) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        loss_axes.plot(*zip(*train, strict=True), label="training loss (label-smoothed)")
    if evaluation:
        eval_steps, eval_losses = [e["step"] for e in evaluation], [e["eval_loss"] for e in evaluation]
        loss_axes.plot(eval_steps, eval_losses, "o-", label="validation loss")
        for metric, label in (("bleu", "validation BLEU"), ("chrf", "validation chrF")):
            points = [(e["step"], e[f"eval_{metric}"]) for e in evaluation if f"eval_{metric}" in e]
            if points:
                score_axes.plot(*zip(*points, strict=True), "o-", label=label)
    loss_axes.set(xlabel="step", ylabel="loss", title="Loss")
    score_axes.set(xlabel="step", ylabel="score", title="BLEU / chrF (sacreBLEU)")
    for axes in (loss_axes, score_axes):
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
