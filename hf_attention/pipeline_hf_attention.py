"""The "text2text-generation", "translation" and "summarization" pipelines, which transformers 5 removed.

It imports only transformers, torch and the configuration file. modeling_hf_attention.py imports it, so
`save_pretrained` / `push_to_hub` save this file beside the model's code, and they declare the tasks in the config's
`custom_pipelines`:
`pipeline("translation", model=folder_or_repo_id, trust_remote_code=True)` works where hf_attention is not installed.
Importing hf_attention also registers the classes with transformers' `PIPELINE_REGISTRY`.
"""

from typing import Any

import torch
from transformers import GenerationConfig, Pipeline

from .configuration_hf_attention import require_positive_integers

# Options that must be positive integers; transformers would fail on them deep inside (ZeroDivisionError, range()).
POSITIVE_OPTIONS = ("num_beams", "num_return_sequences", "max_new_tokens", "max_length", "num_beam_groups")


def _check_positive(name: str, value: Any) -> None:
    require_positive_integers({f"`{name}`": value})


class Text2TextGenerationPipeline(Pipeline):
    """Text in, generated text out, with any encoder-decoder model: `pipe("...")` -> `[{"generated_text": ...}]`.

    Generation options (`num_beams`, `max_new_tokens`, `do_sample`, `num_return_sequences`, ...) pass through to
    `generate()`, at construction or per call; `batch_size=` batches inputs with padding; `device=` places the model.
    """

    return_name = "generated"
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True
    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=256)

    def _sanitize_parameters(
        self,
        return_tensors: bool | None = None,
        return_text: bool | None = None,
        clean_up_tokenization_spaces: bool | None = None,
        truncation: bool | None = None,
        **generate_kwargs: Any,
    ) -> tuple[dict, dict, dict]:
        preprocess_params = {} if truncation is None else {"truncation": truncation}
        postprocess_params = {}
        if return_tensors is not None:
            postprocess_params["return_tensors"] = return_tensors
        if return_text is not None:
            postprocess_params["return_tensors"] = not return_text
        if clean_up_tokenization_spaces is not None:
            postprocess_params["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
        for name in POSITIVE_OPTIONS:
            _check_positive(name, generate_kwargs.get(name))
        return preprocess_params, generate_kwargs, postprocess_params

    def preprocess(self, inputs: str, truncation: bool = False) -> dict[str, torch.Tensor]:
        if not isinstance(inputs, str):
            raise TypeError(f"{type(self).__name__} takes a string or a list of strings, got {type(inputs).__name__}.")
        prefix = self.prefix or ""
        return self.tokenizer(prefix + inputs, truncation=truncation, return_tensors="pt")

    def _forward(self, model_inputs: dict[str, torch.Tensor], **generate_kwargs: Any) -> dict[str, torch.Tensor]:
        batch_size = model_inputs["input_ids"].shape[0]
        output_ids = self.model.generate(**model_inputs, **self._prepare_generate_kwargs(generate_kwargs))
        # (B * num_return_sequences, L) -> (B, num_return_sequences, L)
        return {"output_ids": output_ids.reshape(batch_size, -1, output_ids.shape[-1])}

    def postprocess(
        self, model_outputs: dict, return_tensors: bool = False, clean_up_tokenization_spaces: bool = False
    ) -> list[dict[str, Any]]:
        records = []
        for output_ids in model_outputs["output_ids"][0]:
            if return_tensors:
                records.append({f"{self.return_name}_token_ids": output_ids})
            else:
                text = self.tokenizer.decode(
                    output_ids, skip_special_tokens=True, clean_up_tokenization_spaces=clean_up_tokenization_spaces
                )
                records.append({f"{self.return_name}_text": text})
        return records

    def __call__(self, inputs: str | list[str], **kwargs: Any) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Generate for one text or a list; a list with one output each gives one flat list, as in transformers 4."""
        _check_positive("batch_size", kwargs.get("batch_size", self._batch_size))
        result = super().__call__(inputs, **kwargs)
        if isinstance(inputs, list) and all(isinstance(item, list) and len(item) == 1 for item in result):
            return [item[0] for item in result]
        return result


class TranslationPipeline(Text2TextGenerationPipeline):
    """Translation: `pipe("...")` -> `[{"translation_text": ...}]`.

    `src_lang` / `tgt_lang` are passed to tokenizers that take them (multilingual ones); a one-pair model needs none.
    """

    return_name = "translation"

    def _sanitize_parameters(
        self, src_lang: str | None = None, tgt_lang: str | None = None, **kwargs: Any
    ) -> tuple[dict, dict, dict]:
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        for name, value in (("src_lang", src_lang), ("tgt_lang", tgt_lang)):
            if value is not None:
                preprocess_params[name] = value
        return preprocess_params, forward_params, postprocess_params

    def preprocess(
        self, inputs: str, truncation: bool = False, src_lang: str | None = None, tgt_lang: str | None = None
    ) -> dict[str, torch.Tensor]:
        if src_lang is not None or tgt_lang is not None:
            if not hasattr(self.tokenizer, "_build_translation_inputs"):
                raise ValueError(
                    f"`src_lang`/`tgt_lang` need a multilingual tokenizer; {type(self.tokenizer).__name__} "
                    "translates one language pair."
                )
            return self.tokenizer._build_translation_inputs(
                inputs, return_tensors="pt", truncation=truncation, src_lang=src_lang, tgt_lang=tgt_lang
            )
        return super().preprocess(inputs, truncation=truncation)


class SummarizationPipeline(Text2TextGenerationPipeline):
    """Summarization: `pipe("...")` -> `[{"summary_text": ...}]`."""

    return_name = "summary"


# Task -> class; `hf_attention` registers these and writes them into saved configs' `custom_pipelines`.
PIPELINES = {
    "text2text-generation": Text2TextGenerationPipeline,
    "translation": TranslationPipeline,
    "summarization": SummarizationPipeline,
}
