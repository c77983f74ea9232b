"""hf_attention: the Transformer of "Attention Is All You Need" as a native Hugging Face seq2seq model.

The layout: the model's files that travel with a checkpoint (`*_hf_attention.py`) at the top, then the wings in the
order of a model's life: `data/` → `training/` → `inference/`, with `metrics/`, `hub/` and `hardware` (what this
machine computes fast) beside them.

What importing it changes in transformers (and nothing else):
- `AutoConfig`, `AutoModel` and `AutoModelForSeq2SeqLM` know `model_type="hf_attention"`, and the classes are marked
  so that `save_pretrained` / `push_to_hub` write the code (and the translation pipelines) beside the weights,
  loadable with `trust_remote_code=True` where hf_attention is not installed;
- `pipeline("translation" | "summarization" | "text2text-generation")` works again for hf_attention models
  (`registration.py`), and PEFT knows our default LoRA targets;
- transformers' quantizer registry knows `quant_method: "hf_attention_int8"` (`inference/quantization.py`), so a saved
  int8 model loads with `from_pretrained`.

Modules that moved into the wings keep their old import paths (`hf_attention.run_translation`,
`hf_attention.translation`, ...): see `MOVED_MODULES`.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import types

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from .configuration_hf_attention import PRESETS, HfAttentionConfig
from .inference.alignment import align
from .inference.ctranslate2_export import export_ctranslate2
from .inference.ensemble import EnsembleForConditionalGeneration
from .inference.onnx_export import OnnxModelForSeq2SeqLM, export_onnx
from .inference.quantization import optimize_for_inference
from .inference.scoring import TargetScore, score
from .modeling_hf_attention import HfAttentionForConditionalGeneration, HfAttentionModel, HfAttentionPreTrainedModel
from .pipeline_hf_attention import SummarizationPipeline, Text2TextGenerationPipeline, TranslationPipeline
from .registration import register_peft_defaults, register_pipelines

__version__ = "0.1.0"

AutoConfig.register(HfAttentionConfig.model_type, HfAttentionConfig, exist_ok=True)
AutoModel.register(HfAttentionConfig, HfAttentionModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(HfAttentionConfig, HfAttentionForConditionalGeneration, exist_ok=True)

HfAttentionConfig.register_for_auto_class("AutoConfig")
HfAttentionModel.register_for_auto_class("AutoModel")
HfAttentionForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")

# transformers 5 removed the seq2seq pipelines: bring them back for hf_attention models (see registration.py).
register_pipelines()
register_peft_defaults(HfAttentionConfig.model_type)

__all__ = [
    "PRESETS",
    "EnsembleForConditionalGeneration",
    "HfAttentionConfig",
    "HfAttentionForConditionalGeneration",
    "HfAttentionModel",
    "HfAttentionPreTrainedModel",
    "OnnxModelForSeq2SeqLM",
    "SummarizationPipeline",
    "TargetScore",
    "Text2TextGenerationPipeline",
    "TranslationPipeline",
    "__version__",
    "align",
    "export_ctranslate2",
    "export_onnx",
    "optimize_for_inference",
    "score",
]


# The modules of the flat layout, and where their code lives now. `import hf_attention.translation` (and
# `from hf_attention.run_translation import main`) keep working: a module that moved whole is the new module itself;
# one split in several looks each name up in its new homes.
MOVED_MODULES = {
    "run_translation": ("training.job", "training.arguments", "training.prepare"),
    "run_folder": ("training.run_folder",),
    "checkpoint_averaging": ("training.checkpoint_averaging",),
    "plots": ("training.plots",),
    "tokenization": ("data.tokenization",),
    "int8_vnni": ("inference.int8_vnni",),
    "ctranslate2_export": ("inference.ctranslate2_export", "inference.errors"),
    "onnx_export": ("inference.onnx_export",),
    "export": ("inference.export",),
    "translation": ("inference.translate",),
    "evaluation": ("inference.evaluate", "metrics.evaluation"),
    "publishing": ("hub.publishing",),
    "model_card": ("hub.model_card",),
    "marian_conversion": ("hub.marian_conversion",),
    "pipeline_registration": ("registration",),
    "peft_defaults": ("registration",),
}  # hf_attention.training and hf_attention.inference are now the wings, which answer their modules' old names


class SplitModule(types.ModuleType):
    """A module of the flat layout whose names now live in several modules."""

    def __init__(self, name: str, homes: list[types.ModuleType]):
        super().__init__(name, f"Moved to {', '.join(home.__name__ for home in homes)}.")
        self._homes = homes

    def __getattr__(self, name: str):
        for home in self._homes:
            if hasattr(home, name):
                return getattr(home, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `hf_attention.OLD` of `MOVED_MODULES` as its new module(s)."""

    def __init__(self):
        self._home_specs = {}  # a home module's own spec, which the import system replaces with the old name's

    def find_spec(self, fullname: str, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package == __name__ and old in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        homes = [importlib.import_module(f"{__name__}.{home}") for home in MOVED_MODULES[spec.name.rpartition(".")[2]]]
        if len(homes) > 1:
            return SplitModule(spec.name, homes)
        self._home_specs[homes[0].__name__] = homes[0].__spec__
        return homes[0]

    def exec_module(self, module) -> None:
        if module.__name__ in self._home_specs:
            module.__spec__ = self._home_specs.pop(module.__name__)


if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, MovedModuleFinder())  # before any finder that might hold a stale copy
