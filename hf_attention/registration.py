"""What `import hf_attention` changes outside the package: the seq2seq pipelines that transformers 5 removed, and
PEFT's default LoRA targets for our model type.

Pipelines: `pipeline("translation" | "translation_xx_to_yy" | "text2text-generation" | "summarization", model=...)`
for hf_attention models, as transformers 4 users wrote it. transformers 5 removed these tasks: `pipeline()` raises
"The task translation has been removed" before it consults its registry, and a saved config's `custom_pipelines` (which
make the tasks work where hf_attention is not installed) ask for `trust_remote_code=True`. Importing hf_attention
registers our pipeline classes, lifts the removal for these tasks, and has `pipeline()` use the installed classes for
hf_attention models, so no remote code runs.

PEFT picks default LoRA target modules by `model_type` from its `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`,
which knows BART and T5 but not models outside transformers; importing hf_attention adds ours there when PEFT is
installed, so `LoraConfig(task_type="SEQ_2_SEQ_LM")` needs no `target_modules`.
"""

import functools
import re
from typing import Any

import transformers
import transformers.pipelines
from transformers import AutoModelForSeq2SeqLM, PretrainedConfig
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_hf_attention import HfAttentionConfig
from .pipeline_hf_attention import PIPELINES

# "translation_en_to_de": the parametrised form transformers 4 accepted.
TRANSLATION_TASK = re.compile(r"translation_(?P<source>[^_]+)_to_(?P<target>[^_]+)")


def _base_task(task: str | None) -> str | None:
    return "translation" if task and TRANSLATION_TASK.fullmatch(task) else task


def _config_model_type(config: Any, model: Any, hub_kwargs: dict) -> str | None:
    """The model type of the config or model a `pipeline()` call names, without loading any weights."""
    for source in (config, model):
        if isinstance(source, PretrainedConfig):
            return source.model_type
        if hasattr(source, "config") and isinstance(source.config, PretrainedConfig):
            return source.config.model_type
    name = config if isinstance(config, str) else model if isinstance(model, str) else None
    if name is None:
        return None
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(name, **hub_kwargs)
    except (OSError, ValueError):
        return None  # not a checkpoint we can read: pipeline() reports it in its own words
    return config_dict.get("model_type")


def _with_hf_attention_pipelines(pipeline_function):
    @functools.wraps(pipeline_function)
    def pipeline(task: str | None = None, model: Any = None, config: Any = None, *args, **kwargs):
        base_task = _base_task(task)
        if base_task in PIPELINES and kwargs.get("pipeline_class") is None:
            hub_kwargs = {key: kwargs[key] for key in ("revision", "token") if kwargs.get(key) is not None}
            if _config_model_type(config, model, hub_kwargs) == HfAttentionConfig.model_type:
                kwargs["pipeline_class"] = PIPELINES[base_task]
                if task not in PIPELINE_REGISTRY.get_supported_tasks():  # e.g. "translation_en_to_de"
                    register(task, PIPELINES[base_task])
        return pipeline_function(task, model, config, *args, **kwargs)

    pipeline._hf_attention_wrapped = True
    return pipeline


def register(task: str, pipeline_class: type) -> None:
    PIPELINE_REGISTRY.register_pipeline(
        task, pipeline_class=pipeline_class, pt_model=AutoModelForSeq2SeqLM, type="text"
    )


def register_pipelines() -> None:
    """Register the seq2seq tasks with transformers and route `pipeline()` for hf_attention models (idempotent)."""
    for task, pipeline_class in PIPELINES.items():
        register(task, pipeline_class)
        transformers.pipelines.REMOVED_TASKS.pop(task, None)
    if not getattr(transformers.pipelines.pipeline, "_hf_attention_wrapped", False):
        wrapped = _with_hf_attention_pipelines(transformers.pipelines.pipeline)
        transformers.pipelines.pipeline = wrapped
        transformers.pipeline = wrapped


# Every projection of every attention: encoder self-, decoder self- and cross-attention (W^Q, W^K, W^V, W^O).
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]


def register_peft_defaults(model_type: str) -> None:
    """Declare our default LoRA targets to PEFT, if it is installed (it is optional)."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError:
        return
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(model_type, LORA_TARGET_MODULES)
