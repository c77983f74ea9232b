"""The options that make a training step faster give the step they replace: bf16 autocast within bf16's tolerance
with fp32 master weights, and torch.compile without a graph break in our model code; each refused where the machine
cannot run it."""

import pytest
import torch

from hf_attention import HfAttentionForConditionalGeneration, training
from hf_attention.modeling_hf_attention import label_smoothed_cross_entropy
from hf_attention.run_translation import main

from .conftest import padded_batch


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


@pytest.mark.parametrize(
    "flag, missing, message",
    [
        ("--bf16", "bf16", "--bf16: this CPU has no bf16 instructions \\(AVX512-BF16 or AMX\\)"),
        ("--torch_compile", "compiler", "--torch_compile: torch.compile on CPU needs a C\\+\\+ compiler"),
    ],
)
def test_a_speed_option_the_machine_cannot_run_is_refused_before_training(tmp_path, monkeypatch, flag, missing,
                                                                          message):  # fmt: skip
    if missing == "bf16":
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    else:
        monkeypatch.setattr(training.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match=message):
        main(["--toy_corpus", flag, "--output_dir", str(tmp_path / "out"), "--max_steps", "1"])
    assert not (tmp_path / "out").exists()
