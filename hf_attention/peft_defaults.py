"""PEFT's default LoRA targets for hf_attention, so `LoraConfig(task_type="SEQ_2_SEQ_LM")` needs no `target_modules`.

PEFT picks default target modules by `model_type` from its `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`,
which knows BART and T5 but not models outside transformers; `import hf_attention` adds ours there when PEFT is
installed.
"""

# Every projection of every attention: encoder self-, decoder self- and cross-attention (W^Q, W^K, W^V, W^O).
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]


def register_peft_defaults(model_type: str) -> None:
    """Declare our default LoRA targets to PEFT, if it is installed (it is optional)."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError:
        return
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(model_type, LORA_TARGET_MODULES)
