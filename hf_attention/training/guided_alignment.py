"""Guided-alignment training (Garg et al., 2019, "Jointly Learning to Align and Translate with Transformer Models"):
one cross-attention head of one decoder layer learns given word alignments, so that its attention aligns.

The loss is the cross-entropy from the alignment distribution to that head's attention: each target token with links
spreads its mass evenly over the source tokens it is linked to (`GuidedAlignmentCollator`'s matrix, normalised by
row), and loses -Σ_s G[t, s] log A[t, s]; the loss averages over the target tokens that have links and is added to
the translation loss with weight λ (`--guided_alignment_weight`).

The head's attention is recomputed from the inputs its layer received (captured by a forward pre-hook while the model
runs as usual, with any attention kernel): one head's query and key projections, scaled dot products, the source
padding masked, softmax. Attention dropout does not apply: the weights taught are the ones `align` reads.
"""

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def capture_cross_attention_inputs(model: nn.Module, layer: int):
    """Within the block, the dict yielded holds the last `hidden_states` (queries' input, (B, T, D)) and
    `key_value_states` (the encoder output, (B, S, D)) that decoder layer `layer`'s cross-attention received."""
    attention = model.get_decoder().layers[layer].encoder_attn
    captured: dict[str, torch.Tensor] = {}

    def remember(module, args, kwargs):
        captured["hidden_states"] = args[0] if args else kwargs["hidden_states"]
        captured["key_value_states"] = kwargs.get("key_value_states", args[1] if len(args) > 1 else None)

    handle = attention.register_forward_pre_hook(remember, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def head_log_attention(
    attention: nn.Module,
    hidden_states: torch.Tensor,
    encoder_states: torch.Tensor,
    source_mask: torch.Tensor,
    head: int,
) -> torch.Tensor:
    """Log of head `head`'s attention weights (B, T, S) in a `MultiHeadAttention`, the source padding excluded."""
    width = attention.head_dim
    rows = slice(head * width, (head + 1) * width)
    query = nn.functional.linear(hidden_states, attention.q_proj.weight[rows], attention.q_proj.bias[rows])
    key = nn.functional.linear(encoder_states, attention.k_proj.weight[rows], attention.k_proj.bias[rows])
    scores = torch.matmul(query.float(), key.float().transpose(1, 2)) * attention.scaling
    scores = scores.masked_fill(~source_mask.bool()[:, None, :], torch.finfo(scores.dtype).min)
    return scores.log_softmax(-1)


def guided_alignment_loss(log_attention: torch.Tensor, alignment_targets: torch.Tensor) -> torch.Tensor:
    """-Σ_s G[t, s] log A[t, s] averaged over the target tokens with links; G is `alignment_targets` (B, T, S, 0/1)
    with each row normalised. 0 for a batch without links."""
    targets = alignment_targets.to(log_attention.device, log_attention.dtype)
    links_per_row = targets.sum(-1, keepdim=True)
    has_links = links_per_row.squeeze(-1) > 0
    if not has_links.any():
        return log_attention.sum() * 0.0  # keeps the graph: every process takes part in the backward pass
    distribution = targets / links_per_row.clamp(min=1)
    return -(distribution * log_attention).sum(-1)[has_links].mean()
