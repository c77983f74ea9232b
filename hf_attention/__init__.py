"""hf_attention: the Transformer of "Attention Is All You Need" as a native Hugging Face seq2seq model.

Importing the package registers the model with `AutoConfig`, `AutoModel` and `AutoModelForSeq2SeqLM`, and marks the
classes so that `save_pretrained` / `push_to_hub` write the code (and the translation pipelines) beside the weights,
loadable with `trust_remote_code=True` where hf_attention is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_hf_attention import PRESETS, HfAttentionConfig
from .modeling_hf_attention import (
    HfAttentionForConditionalGeneration,
    HfAttentionModel,
    HfAttentionPreTrainedModel,
)
from .pipeline_hf_attention import (
    PIPELINES,
    SummarizationPipeline,
    Text2TextGenerationPipeline,
    TranslationPipeline,
)

__version__ = "0.1.0"

AutoConfig.register(HfAttentionConfig.model_type, HfAttentionConfig, exist_ok=True)
AutoModel.register(HfAttentionConfig, HfAttentionModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(HfAttentionConfig, HfAttentionForConditionalGeneration, exist_ok=True)

HfAttentionConfig.register_for_auto_class("AutoConfig")
HfAttentionModel.register_for_auto_class("AutoModel")
HfAttentionForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")

# transformers 5 removed these tasks; `pipeline(task, model=..., trust_remote_code=True)` finds them through the
# `custom_pipelines` that saved checkpoints declare, and the registry lets `Pipeline.save_pretrained` name them.
for _task, _pipeline_class in PIPELINES.items():
    PIPELINE_REGISTRY.register_pipeline(
        _task, pipeline_class=_pipeline_class, pt_model=AutoModelForSeq2SeqLM, type="text"
    )

__all__ = [
    "PRESETS",
    "HfAttentionConfig",
    "HfAttentionForConditionalGeneration",
    "HfAttentionModel",
    "HfAttentionPreTrainedModel",
    "SummarizationPipeline",
    "Text2TextGenerationPipeline",
    "TranslationPipeline",
    "__version__",
]
