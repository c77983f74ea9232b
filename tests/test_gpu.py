"""CUDA-only checks: flash attention and SDPA against eager in half precision, generation on the GPU."""

import pytest
import torch

from hf_attention import HfAttentionForConditionalGeneration

from .conftest import padded_batch

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
