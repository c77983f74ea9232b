"""The paper's training recipe (§5.3, §5.4) as `Seq2SeqTrainingArguments`, for `Seq2SeqTrainer`."""

from typing import Any

from transformers import Seq2SeqTrainingArguments


def paper_learning_rate(d_model: int, warmup_steps: int) -> float:
    """Peak of lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5) (eq. 3), reached at step = warmup.

    transformers' "inverse_sqrt" schedule warms up linearly to this peak and then decays as sqrt(warmup / step),
    which is eq. 3 exactly.
    """
    return d_model**-0.5 * warmup_steps**-0.5


def paper_training_arguments(output_dir: str, d_model: int, warmup_steps: int = 4000, **overrides: Any):
    """Adam(β1=0.9, β2=0.98, ε=1e-9), the eq. 3 schedule, label smoothing 0.1, no weight decay; all overridable."""
    arguments = {
        "output_dir": output_dir,
        "optim": "adamw_torch",
        "adam_beta1": 0.9,
        "adam_beta2": 0.98,
        "adam_epsilon": 1e-9,
        "weight_decay": 0.0,
        "learning_rate": paper_learning_rate(d_model, warmup_steps),
        "lr_scheduler_type": "inverse_sqrt",
        "warmup_steps": warmup_steps,
        "label_smoothing_factor": 0.1,
        "predict_with_generate": True,
        "report_to": "none",
        **overrides,
    }
    return Seq2SeqTrainingArguments(**arguments)
