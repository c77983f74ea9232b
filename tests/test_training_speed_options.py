"""The options that make a training step faster give the step they replace: bf16 autocast within bf16's tolerance
with fp32 master weights, and torch.compile without a graph break in our model code; compile refused where the machine
cannot run it, emulated bf16 warned about; `--precision auto` choosing bf16 only where the CPU computes it."""

import pytest
import torch
from transformers import TrainerCallback

from hf_attention import HfAttentionForConditionalGeneration
from hf_attention.modeling_hf_attention import label_smoothed_cross_entropy
from hf_attention.training import arguments
from hf_attention.training.arguments import parse_arguments
from hf_attention.training.job import main, run

from .helpers import padded_batch, with_capabilities


def training_batch() -> dict:
    source, target = padded_batch([7, 5, 6], max_length=7), padded_batch([6, 4, 5], max_length=6, seed=1)
    labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
    return {**source, "labels": labels}


def loss_and_gradients(model, batch: dict, bf16: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(**batch).logits
        loss = label_smoothed_cross_entropy(logits, batch["labels"], 0.1)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_bf16_autocast_gives_the_fp32_loss_and_gradients_within_bf16_tolerance(tiny_config):
    model = HfAttentionForConditionalGeneration(tiny_config).train()
    batch = training_batch()
    loss32, gradients32 = loss_and_gradients(model, batch, bf16=False)
    loss16, gradients16 = loss_and_gradients(model, batch, bf16=True)
    torch.testing.assert_close(loss16.float(), loss32, rtol=2e-2, atol=0)
    assert gradients16.keys() == gradients32.keys()
    for name, gradient in gradients32.items():
        if gradient.norm() > 1e-6:
            cosine = torch.nn.functional.cosine_similarity(gradients16[name].flatten(), gradient.flatten(), dim=0)
            assert cosine > 0.99, f"{name}: cosine {cosine:.4f}"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the master weights stay fp32


@pytest.mark.slow
def test_the_training_step_compiles_without_a_graph_break(tiny_config):
    torch._dynamo.reset()
    model = HfAttentionForConditionalGeneration(tiny_config).train()
    batch = training_batch()

    def step(**inputs):
        return label_smoothed_cross_entropy(model(**inputs).logits, inputs["labels"], 0.1)

    explanation = torch._dynamo.explain(step)(**batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_the_blockwise_loss_equals_pytorchs_cross_entropy_in_value_and_gradient(epsilon):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50, requires_grad=True)
    labels = torch.randint(0, 50, (3, 5))
    labels[0, 3:] = -100
    reference_logits = logits.detach().clone().requires_grad_(True)
    ours = label_smoothed_cross_entropy(logits, labels, epsilon)
    reference = (
        torch.nn.functional.cross_entropy(
            reference_logits.flatten(0, 1),
            labels.flatten(),
            ignore_index=-100,
            label_smoothing=epsilon,
            reduction="sum",
        )
        / labels.ne(-100).sum()
    )
    ours.backward()
    reference.backward()
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(logits.grad, reference_logits.grad)


def test_the_loss_keeps_no_vocabulary_sized_tensor_beside_the_logits():
    logits = torch.randn(4, 6, 300, requires_grad=True)
    labels = torch.randint(0, 300, (4, 6))
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        label_smoothed_cross_entropy(logits, labels, 0.1)
    vocabulary_sized = [t for t in saved if t.numel() >= logits.numel() and t.data_ptr() != logits.data_ptr()]
    assert vocabulary_sized == []  # nn.functional.cross_entropy keeps its (B·T, V) log-softmax here


def test_torch_compile_is_refused_before_training_where_no_compiler_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(arguments.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="--torch_compile: torch.compile on CPU needs a C\\+\\+ compiler"):
        main(["--toy_corpus", "--torch_compile", "--output_dir", str(tmp_path / "out"), "--max_steps", "1"])
    assert not (tmp_path / "out").exists()


def test_bf16_on_a_cpu_that_emulates_it_trains_after_one_warning_with_the_cost(tmp_path, monkeypatch):
    with_capabilities(monkeypatch, "avx2")
    with pytest.warns(UserWarning, match=r"--bf16: this CPU has no bf16 instructions .* emulated, .*slower"):
        main(["--toy_corpus", "--toy_train_size", "50", "--toy_eval_size", "2", "--vocab_size", "120", "--bf16",
              "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--save_strategy", "no",
              "--generation_max_length", "4", "--test_before_training", "false"])  # fmt: skip
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "cpu_class, arguments, bf16",
    [
        ("avx2", ["--precision", "auto"], False),
        ("avx512-vnni", ["--precision", "auto"], False),
        ("avx512-bf16", ["--precision", "auto"], True),
        ("amx", ["--bf16", "auto"], True),
        ("avx2", ["--bf16=auto"], False),
        ("avx2", ["--precision", "bf16"], True),  # asked for: trains emulated, with the warning
        ("avx512-bf16", ["--precision", "fp32"], False),
        ("avx512-bf16", [], False),  # transformers' default: fp32 unless --bf16
        ("avx2", ["--precision", "auto", "--bf16"], True),  # an explicit flag beside auto is the user's
    ],
)
def test_precision_auto_is_bf16_only_where_the_cpu_computes_it(monkeypatch, cpu_class, arguments, bf16):
    with_capabilities(monkeypatch, cpu_class)
    _, _, training_args = parse_arguments(["--toy_corpus", *arguments])
    assert training_args.bf16 is bf16 and not training_args.fp16
    assert training_args.precision_used == ("bf16" if bf16 else "fp32")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--precision", "fp8"], "--precision fp8: choose one of auto, bf16, fp16, fp32"),
        (["--precision", "fp32", "--bf16"], "--precision fp32 with --bf16: they contradict each other"),
    ],
)
def test_a_bad_precision_is_refused_in_one_line(capsys, arguments, message):
    with pytest.raises(SystemExit):
        parse_arguments(["--toy_corpus", *arguments])
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


@pytest.mark.parametrize(
    "arguments, kernel",
    [(["--bf16"], "eager"), ([], "sdpa"), (["--bf16", "--attn_implementation", "sdpa"], "sdpa")],
    ids=["bf16", "fp32", "named"],
)
def test_bf16_training_on_a_cpu_uses_eager_attention_unless_a_kernel_is_named(
    tmp_path, monkeypatch, arguments, kernel
):
    """SDPA's fused CPU kernel is slow in bf16's backward pass (hardware.training_attention); the saved model keeps
    no trace of the choice, so it decodes with transformers' default."""
    with_capabilities(monkeypatch, "avx512-bf16")
    seen = []

    class RecordAttention(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen.append(model.config._attn_implementation)

    output = tmp_path / "out"
    run(*parse_arguments(["--toy_corpus", "--toy_train_size", "50", "--toy_eval_size", "2", "--vocab_size", "120",
                          "--output_dir", str(output), "--max_steps", "1", "--save_strategy", "no",
                          "--generation_max_length", "4", "--test_before_training", "false", *arguments]),
        callbacks=[RecordAttention()])  # fmt: skip
    assert seen == [kernel]
    assert "attn_implementation" not in (output / "config.json").read_text()
