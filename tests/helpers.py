"""What the tests share: small padded batches, a tokenizer trained on the toy corpus, running code where hf_attention
is not installed, the environment of a user of the loopback Hub, faked machines, and the skips that CI refuses."""

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from hf_attention import hardware
from hf_attention.data import toy_translation_corpus
from hf_attention.data.tokenization import train_tokenizer

ROOT = Path(__file__).parent.parent
# Under CI the test extra is installed and the int8 operations build: a skip for either would hide a broken install.
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")
PAD, BOS, EOS = 0, 1, 2

# Marian's conventions (see hf_attention.hub.marian_conversion): split sinusoid, logits bias, a separate target
# vocabulary.
MARIAN_STYLE = {
    "sinusoidal_layout": "split",
    "add_final_logits_bias": True,
    "share_encoder_decoder_embeddings": False,
    "decoder_vocab_size": 120,
}


def padded_batch(lengths: list[int], max_length: int, vocab_size: int = 99, seed: int = 0) -> dict:
    """Right-padded ids ending in EOS, with the matching attention mask."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (len(lengths), max_length), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, length - 1] = EOS
        input_ids[row, length:] = PAD
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


WITHOUT_HF_ATTENTION = 'import sys\nsys.modules["hf_attention"] = None  # as where hf_attention is not installed\n'


def toy_tokenizer(vocab_size: int = 150, pairs: int = 200) -> PreTrainedTokenizerFast:
    """A joint BPE tokenizer trained on both sides of `pairs` toy sentence pairs."""
    texts = [pair["translation"][lang] for pair in toy_translation_corpus(pairs) for lang in ("en", "de")]
    return train_tokenizer(texts, vocab_size=vocab_size)


def run_without_hf_attention(
    script: str, *arguments: str, environment: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run the Python `script` (with `arguments` in sys.argv[1:]) in a fresh process where hf_attention cannot be
    imported, as on a machine that only has transformers."""
    code = WITHOUT_HF_ATTENTION + textwrap.dedent(script)
    return subprocess.run(
        [sys.executable, "-c", code, *arguments], capture_output=True, text=True, env=environment,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def hub_environment(hub, home: Path, token: bool = True, offline: bool = False) -> dict[str, str]:
    """The environment of one user of the loopback Hub `hub`, with their own cache in `home`."""
    environment = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}
    environment.pop("HF_TOKEN", None)
    if token:
        environment["HF_TOKEN"] = hub.token
    if offline:
        environment["HF_HUB_OFFLINE"] = "1"
    return environment


def with_capabilities(
    monkeypatch, cpu_class: str, cuda_devices: tuple[hardware.CudaDevice, ...] = ()
) -> hardware.Capabilities:
    """Every choice made during the test reads the capability map of a typical `cpu_class` CPU (undone after it)."""
    machine = hardware.Capabilities.for_cpu_class(cpu_class, cuda_devices)
    monkeypatch.setattr(hardware, "_installed", [machine])
    return machine


def save_toy_translation_model(folder: Path) -> Path:
    """A seeded tiny untrained model and the toy tokenizer, saved in `folder`: what the translate and serve tests
    load."""
    from hf_attention import HfAttentionConfig, HfAttentionForConditionalGeneration

    tokenizer = toy_tokenizer()
    special = {name: getattr(tokenizer, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    config = HfAttentionConfig.from_preset("tiny", vocab_size=len(tokenizer), **special)
    torch.manual_seed(0)
    HfAttentionForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_perturbed_copy(folder: Path, destination: Path, scale: float, seed: int = 5) -> Path:
    """`folder`'s model with seeded noise of `scale` added to every weight, saved with its tokenizer in
    `destination`: a second model of the same vocabulary, for ensembles."""
    from transformers import AutoTokenizer

    from hf_attention import HfAttentionForConditionalGeneration

    model = HfAttentionForConditionalGeneration.from_pretrained(folder)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * scale)
    model.save_pretrained(destination)
    AutoTokenizer.from_pretrained(folder).save_pretrained(destination)
    return destination


def generate_alone(folder: Path, sentence: str, num_beams: int, n_best: int = 1, max_new_tokens: int = 12):
    """`generate()` on `sentence` alone: its `n_best` hypotheses with their scores (beam search: the length-normalised
    score it ranks by; greedy: the sum of the chosen tokens' log-probabilities)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    output = model.generate(**tokenizer([sentence], return_tensors="pt"), num_beams=num_beams,
                            max_new_tokens=max_new_tokens, num_return_sequences=n_best, return_dict_in_generate=True,
                            output_scores=True)  # fmt: skip
    texts = [text.strip() for text in tokenizer.batch_decode(output.sequences, skip_special_tokens=True)]
    if num_beams > 1:
        return list(zip(texts, output.sequences_scores.tolist(), strict=True))
    steps = model.compute_transition_scores(output.sequences, output.scores, normalize_logits=True)
    return list(zip(texts, steps.masked_fill(steps.isinf(), 0).sum(1).tolist(), strict=True))


def require_module(name: str, extra: str = "test"):
    """`pytest.importorskip` for a package of an extra (at module level too), except under `CI=true`, where the test
    extra is installed and a missing package fails the run instead of hiding behind a skip."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        message = f"{name} is not installed ({error}); pip install 'hf_attention[{extra}]'"
        if IN_CI:
            pytest.fail(f"{message}. Under CI=true a missing test extra fails instead of skipping.", pytrace=False)
        pytest.skip(message, allow_module_level=True)


def require_cpu_kernel(kernel: str) -> None:
    """Skip unless hf_attention's CPU operation `kernel` ("vnni" or "avx2": the int8 products; "attention": the
    cached attention) runs here. A CPU (or capability map) without the instructions skips with that reason
    everywhere; a CPU that has them but a build that failed skips only outside CI: under `CI=true` it fails, since
    the suite would otherwise pass without testing the kernels."""
    from hf_attention.inference import int8_vnni

    instructions = {"vnni": "avx512_vnni", "avx2": "avx2", "attention": "avx2"}[kernel]
    available = {"vnni": int8_vnni.int8_vnni_available, "avx2": int8_vnni.int8_avx2_available,
                 "attention": int8_vnni.cached_attention_available}[kernel]  # fmt: skip
    if available():
        return
    if not (getattr(hardware.capabilities(), instructions) and getattr(hardware.detect(), instructions)):
        pytest.skip(f"no {instructions.upper()} on this CPU (or masked by HF_ATTENTION_CPU_CAPABILITY)")
    message = f"this CPU has {instructions.upper()} but hf_attention's CPU operations did not build"
    if IN_CI:
        pytest.fail(f"{message}: under CI=true a failed build fails instead of skipping.", pytrace=False)
    pytest.skip(message)
