"""The private parts of transformers and accelerate that hf_attention overrides or calls, pinned in one place.

Each is a hook that no public API offers (listed with the module that relies on it). A release that renames one,
changes its parameters or stops calling it fails here, naming the hook and our module, instead of changing what our
models do without a word. Behaviour that rests on a hook's arithmetic is pinned by the tests named beside it.
"""

import inspect

import pytest
import transformers
from accelerate.data_loader import BatchSamplerShard
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel, Seq2SeqTrainer
from transformers.quantizers import HfQuantizer

# (owner, name, the parameters we pass or receive, our module that relies on it)
HOOKS = [
    (GenerationMixin, "_maybe_prepare_encoder_kwargs_for_generation",
     ["inputs_tensor", "model_kwargs", "model_input_name", "generation_config"], "generation_hf_attention, ensemble"),
    (GenerationMixin, "_expand_inputs_for_generation", ["expand_size", "is_encoder_decoder", "input_ids"],
     "generation_hf_attention, ensemble"),
    (GenerationMixin, "_prepare_cache_for_generation",
     ["generation_config", "model_kwargs", "generation_mode", "batch_size", "max_cache_length"],
     "generation_hf_attention, ensemble"),
    (GenerationMixin, "prepare_inputs_for_generation", ["input_ids", "next_sequence_length", "cache"],
     "generation_hf_attention, ensemble, constraints_hf_attention"),
    (GenerationMixin, "_prefill", ["input_ids", "generation_config", "model_kwargs"], "constraints_hf_attention"),
    (GenerationMixin, "_update_model_kwargs_for_generation", ["outputs", "model_kwargs", "is_encoder_decoder"],
     "constraints_hf_attention"),
    (GenerationMixin, "_beam_search", ["input_ids", "logits_processor", "stopping_criteria", "generation_config"],
     "constraints_hf_attention (a custom_generate method is called as this is)"),
    (PreTrainedModel, "get_compiled_call", ["compile_config"], "generation_hf_attention.install_compiled_steps"),
    (Seq2SeqTrainer, "_save_checkpoint", ["model", "trial"], "training.trainer"),
    (Seq2SeqTrainer, "_get_output_dir", ["trial"], "training.trainer"),
    (Seq2SeqTrainer, "_remove_unused_columns", ["dataset", "description"], "training.trainer"),
    (Seq2SeqTrainer, "_set_signature_columns_if_needed", [], "training.trainer (guided alignment)"),
    (Seq2SeqTrainer, "_load_from_checkpoint", ["resume_from_checkpoint"], "training.trainer"),
    (Seq2SeqTrainer, "compute_loss", ["model", "inputs", "return_outputs", "num_items_in_batch"],
     "training.trainer (guided alignment)"),
    (Seq2SeqTrainer, "evaluation_loop", ["dataloader", "description", "prediction_loss_only"],
     "training.trainer (sentences counted once on several processes)"),
    (HfQuantizer, "_process_model_before_weight_loading", ["model"], "inference.quantization"),
    (HfQuantizer, "_process_model_after_weight_loading", ["model"], "inference.quantization"),
]  # fmt: skip


@pytest.mark.parametrize("owner, name, parameters, ours", HOOKS, ids=[f"{o.__name__}.{n}" for o, n, *_ in HOOKS])
def test_the_private_hooks_we_override_or_call_are_still_there(owner, name, parameters, ours):
    where = f"transformers {transformers.__version__}: {owner.__name__}.{name}"
    assert hasattr(owner, name), f"{where} is gone; {ours} relies on it."
    signature = inspect.signature(getattr(owner, name))
    missing = [parameter for parameter in parameters if parameter not in signature.parameters]
    assert not missing, f"{where} no longer takes {missing} ({signature}); update {ours}."


def test_generate_still_calls_the_hooks_and_takes_custom_decoding_methods():
    generate = inspect.getsource(GenerationMixin.generate)
    assert "isinstance(custom_generate, Callable)" in generate, "generate() no longer runs a callable custom_generate"
    extract = inspect.getsource(GenerationMixin._extract_generation_mode_kwargs)
    assert "custom_generate_kwargs" in extract, "custom decoding methods' own arguments (constraints=) are not passed"
    beam_search = inspect.getsource(GenerationMixin._beam_search)
    assert "self._reorder_cache(" in beam_search, "beam search no longer reorders through model._reorder_cache"
    # `install_compiled_steps` sets the compiled call where get_compiled_call looks for it
    compiled = inspect.getsource(PreTrainedModel.get_compiled_call)
    assert "_compiled_call" in compiled and "_last_compile_config" in compiled
    # constraints_hf_attention reads the special tokens generate() prepared
    special = inspect.getsource(GenerationMixin._prepare_special_tokens)
    assert "_eos_token_tensor" in special and "_pad_token_tensor" in special


def test_loading_and_pipelines_still_work_as_we_assume():
    # a generation config saved as derived from the model config loses its extra fields (training.job clears it)
    assert "_from_model_config" in inspect.getsource(GenerationConfig.__init__)
    # registration.py brings the removed seq2seq pipelines back by taking them out of this table
    assert isinstance(transformers.pipelines.REMOVED_TASKS, dict)
    # training.trainer makes accelerate's shard a passthrough for our per-process token batches
    shard = BatchSamplerShard([[0], [1]], num_processes=2, process_index=1)
    assert (shard.num_processes, shard.process_index) == (2, 1) and hasattr(shard, "batch_sampler")
    # training.trainer's evaluation_loop chooses how the loop gathers: Seq2SeqTrainer sets `gather` before the loop,
    # the loop gathers through the attribute (test_train: two processes evaluate a saved model as one does)
    evaluate = inspect.getsource(Seq2SeqTrainer.evaluate)  # its generation arguments kept where the override reads
    assert "self.gather_function = self.accelerator.gather\n" in evaluate and "self._gen_kwargs = " in evaluate
    assert "self.gather_function(losses" in inspect.getsource(Seq2SeqTrainer.evaluation_loop)
