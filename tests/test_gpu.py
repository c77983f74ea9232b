"""CUDA-only checks: flash attention and SDPA against eager in half precision, generation on the GPU, decoding
steps that never wait for the GPU, and compiled static-cache decoding (CUDA graphs)."""

import pytest
import torch
from transformers import EncoderDecoderCache, StaticCache

from hf_attention import HfAttentionForConditionalGeneration, optimize_for_inference

from .helpers import padded_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def logits_with(tiny_config, attn_implementation, dtype):
    torch.manual_seed(0)
    model = HfAttentionForConditionalGeneration(tiny_config).eval().to("cuda", dtype)
    model.set_attn_implementation(attn_implementation)
    batch = {k: v.cuda() for k, v in padded_batch([7, 4, 6], max_length=7).items()}
    target = {k: v.cuda() for k, v in padded_batch([5, 3, 5], max_length=5, seed=1).items()}
    with torch.no_grad():
        logits = model(**batch, decoder_input_ids=target["input_ids"], decoder_attention_mask=target["attention_mask"])
    return logits.logits.float(), target["attention_mask"].bool()


@pytest.mark.parametrize("backend", ["sdpa", "flash_attention_2"])
def test_half_precision_backends_agree_with_eager(tiny_config, backend):
    if backend == "flash_attention_2":
        pytest.importorskip("flash_attn")
    eager, keep = logits_with(tiny_config, "eager", torch.bfloat16)
    other, _ = logits_with(tiny_config, backend, torch.bfloat16)
    torch.testing.assert_close(other[keep], eager[keep], atol=3e-2, rtol=3e-2)
    assert torch.isfinite(other).all()


def test_generation_on_gpu_matches_cpu(tiny_config):
    torch.manual_seed(0)
    model = HfAttentionForConditionalGeneration(tiny_config).eval()
    batch = padded_batch([7, 4, 6], max_length=7)
    on_cpu = model.generate(**batch, num_beams=4, max_new_tokens=10)
    on_gpu = model.to("cuda").generate(**{k: v.cuda() for k, v in batch.items()}, num_beams=4, max_new_tokens=10)
    assert torch.equal(on_gpu.cpu(), on_cpu)


def test_static_cache_decoding_step_never_waits_for_the_gpu(tiny_config):
    """After the first step, a decoding step with a static cache, given what `generate` gives it (the encoder output
    and the cross-attention mask prepared once), reads nothing back to the host (no stall)."""
    torch.manual_seed(0)
    model = HfAttentionForConditionalGeneration(tiny_config).eval().cuda()
    batch = {k: v.cuda() for k, v in padded_batch([7, 4, 6], max_length=7).items()}
    start = torch.full((3, 1), tiny_config.decoder_start_token_id, device="cuda")
    cache = EncoderDecoderCache(
        StaticCache(config=tiny_config, max_cache_len=16), StaticCache(config=tiny_config, max_cache_len=7)
    )
    with torch.no_grad():
        prepared = model._maybe_prepare_encoder_kwargs_for_generation(
            batch["input_ids"], {"attention_mask": batch["attention_mask"]}, "input_ids", model.generation_config
        )
        assert prepared["attention_mask"].dim() == 4
        step = {"encoder_outputs": prepared["encoder_outputs"], "attention_mask": prepared["attention_mask"]}
        first = model(**step, decoder_input_ids=start, cache=cache, use_cache=True)
        next_tokens = first.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(**step, decoder_input_ids=next_tokens, cache=first.cache, use_cache=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("quantization", [None, "bf16"])
def test_compiled_static_cache_on_cuda_generates_the_eager_tokens(tiny_config, quantization):
    """transformers compiles the step with CUDA graphs ("reduce-overhead"); the tokens stay those of eager decoding."""
    torch.manual_seed(0)
    model = HfAttentionForConditionalGeneration(tiny_config).eval().cuda()
    if quantization:
        model.to(torch.bfloat16)
    batch = {k: v.cuda() for k, v in padded_batch([7, 4, 6], max_length=7).items()}
    eager = model.generate(**batch, max_new_tokens=10)
    optimize_for_inference(model, quantization, compile=True)
    assert model.compiled_steps_config.mode == "reduce-overhead"
    for _ in range(2):  # the second call replays the captured graphs
        assert torch.equal(model.generate(**batch, max_new_tokens=10), eager)


def test_int8_is_refused_on_cuda(tiny_config):
    model = HfAttentionForConditionalGeneration(tiny_config).cuda()
    with pytest.raises(ValueError, match="torch's dynamic int8 kernels run on the CPU"):
        optimize_for_inference(model, "int8")


def test_translate_command_on_cuda_gives_the_cpu_translations(tmp_path):
    from hf_attention import HfAttentionConfig
    from hf_attention.inference.translate import main

    from .helpers import toy_tokenizer

    tokenizer = toy_tokenizer()
    config = HfAttentionConfig.from_preset("tiny", vocab_size=len(tokenizer))
    torch.manual_seed(0)
    HfAttentionForConditionalGeneration(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    source = tmp_path / "source.txt"
    source.write_text("we buy two dogs\nthey sell ninety one trees\ni see cats\n")
    outputs = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "bfloat16")):
        outputs[device, dtype] = tmp_path / f"{device}-{dtype}.txt"
        main(["--model", str(tmp_path / "model"), "--input", str(source), "--output", str(outputs[device, dtype]),
              "--device", device, "--dtype", dtype, "--num_beams", "4", "--max_new_tokens", "12"])  # fmt: skip
    assert outputs["cuda", "float32"].read_text() == outputs["cpu", "float32"].read_text()
    assert len(outputs["cuda", "bfloat16"].read_text().splitlines()) == 3


def test_training_job_trains_in_bf16_on_the_gpu_and_the_saved_model_reloads(tmp_path):
    """The training job on a CUDA machine: the Trainer moves the model to the GPU by itself, bf16 autocast trains
    (the loss falls), and the saved model generates on the GPU after reloading."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, TrainerCallback

    from hf_attention.training.arguments import parse_arguments
    from hf_attention.training.job import run

    from .test_train import QUICK

    class Spy(TrainerCallback):
        devices: set[str] = set()
        losses: list[float] = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.devices.add(next(model.parameters()).device.type)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in (logs or {}):
                self.losses.append(logs["loss"])

    arguments = [*QUICK, "--output_dir", str(tmp_path), "--max_steps", "150", "--bf16", "--toy_eval_size", "8"]
    summary = run(*parse_arguments(arguments), callbacks=[Spy()])
    assert summary.steps == 150 and Spy.devices == {"cuda"}
    assert Spy.losses[-1] < 0.7 * Spy.losses[0], Spy.losses
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).cuda().eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    batch = tokenizer([summary.example_source], return_tensors="pt").to("cuda")
    assert model.generate(**batch, max_new_tokens=8).shape[0] == 1


def test_without_padding_every_attention_runs_on_torchs_flash_kernel_as_eager_does():
    """A batch without padding needs no masks, so SDPA can take torch's FlashAttention kernel, which refuses masks
    (forced here): encoder, causal decoder and cross-attention, in a forward pass and in cached decoding steps."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hf_attention import HfAttentionConfig

    config = HfAttentionConfig.from_preset("tiny", vocab_size=99)  # heads of 16: FlashAttention takes multiples of 8
    torch.manual_seed(0)
    model = HfAttentionForConditionalGeneration(config).eval().to("cuda", torch.bfloat16)
    source = torch.randint(4, 99, (3, 9), device="cuda")
    batch = {"input_ids": source, "attention_mask": torch.ones_like(source)}
    target = torch.randint(4, 99, (3, 6), device="cuda")
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(**batch, decoder_input_ids=target).logits.float()
        model.set_attn_implementation("sdpa")
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = model(**batch, decoder_input_ids=target).logits.float()
            for num_beams in (1, 4):
                assert model.generate(**batch, num_beams=num_beams, max_new_tokens=8).shape[0] == 3
    torch.testing.assert_close(flash, eager, atol=3e-2, rtol=3e-2)
