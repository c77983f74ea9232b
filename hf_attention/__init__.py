"""hf_attention: the Transformer of "Attention Is All You Need" as a native Hugging Face seq2seq model.

Importing the package registers the model with `AutoConfig`, `AutoModel` and `AutoModelForSeq2SeqLM`, and marks the
classes so that `save_pretrained` / `push_to_hub` write the code (and the translation pipelines) beside the weights,
loadable with `trust_remote_code=True` where hf_attention is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from .configuration_hf_attention import PRESETS, HfAttentionConfig
from .ctranslate2_export import export_ctranslate2
from .inference import optimize_for_inference
from .modeling_hf_attention import (
    HfAttentionForConditionalGeneration,
    HfAttentionModel,
    HfAttentionPreTrainedModel,
)
from .onnx_export import OnnxModelForSeq2SeqLM, export_onnx
from .peft_defaults import register_peft_defaults
from .pipeline_hf_attention import (
    SummarizationPipeline,
    Text2TextGenerationPipeline,
    TranslationPipeline,
)
from .pipeline_registration import register_pipelines

__version__ = "0.1.0"

AutoConfig.register(HfAttentionConfig.model_type, HfAttentionConfig, exist_ok=True)
AutoModel.register(HfAttentionConfig, HfAttentionModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(HfAttentionConfig, HfAttentionForConditionalGeneration, exist_ok=True)

HfAttentionConfig.register_for_auto_class("AutoConfig")
HfAttentionModel.register_for_auto_class("AutoModel")
HfAttentionForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")

# transformers 5 removed the seq2seq pipelines: bring them back for hf_attention models (see pipeline_registration.py).
register_pipelines()
register_peft_defaults(HfAttentionConfig.model_type)

__all__ = [
    "PRESETS",
    "HfAttentionConfig",
    "HfAttentionForConditionalGeneration",
    "HfAttentionModel",
    "HfAttentionPreTrainedModel",
    "OnnxModelForSeq2SeqLM",
    "SummarizationPipeline",
    "Text2TextGenerationPipeline",
    "TranslationPipeline",
    "__version__",
    "export_ctranslate2",
    "export_onnx",
    "optimize_for_inference",
]
