"""`reuse_freed_memory`: a decoding process's freed blocks are reused instead of mapped again page by page."""

import subprocess
import sys

import pytest

# Page faults of three `generate()` calls of 32 sentences on a small model, after a first call.
PROGRAM = """
import resource, sys, torch
from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration
from hf_attention.inference.allocator import reuse_freed_memory
if sys.argv[1] == "reuse" and not reuse_freed_memory():
    print("unsupported"); sys.exit()
torch.manual_seed(0)
config = HfAttentionConfig(vocab_size=1000, d_model=256, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=1024,
                           decoder_ffn_dim=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
model = HfAttentionForConditionalGeneration(config).eval()
sources = torch.randint(3, 1000, (32, 40))
def translate():
    with torch.inference_mode():
        model.generate(sources, max_new_tokens=8, num_beams=1, do_sample=False)
translate()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    translate()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> str:
    return subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True).stdout


def test_a_decoding_process_reuses_freed_memory_instead_of_faulting_pages_in():
    if page_faults("reuse").strip() == "unsupported":
        pytest.skip("this C library has no mallopt (glibc's)")
    # The fewest of a few runs each: a busy machine only adds faults (measured here: 4,400 to 23,500 with glibc's
    # defaults, 21 to 1,013 with the setting). glibc's defaults map the batch's larger blocks afresh on every step,
    # each of their pages faulted in.
    default = min(int(page_faults("default")) for _ in range(2))
    reused = min(int(page_faults("reuse")) for _ in range(3))
    assert default > 2_000 and reused < 1_000 and default > 4 * reused, (default, reused)
