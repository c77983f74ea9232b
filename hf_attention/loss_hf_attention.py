"""The training loss of §5.4: cross-entropy with label smoothing, summed a block of rows at a time.

It travels with a checkpoint beside the model file (`modeling_hf_attention.py` imports it), so that a model loaded with
`trust_remote_code=True` trains with the same loss.
"""

import torch


class SummedLabelSmoothedCrossEntropy(torch.autograd.Function):
    """Σ over target tokens of (1 - ε)·(-log p_y) + ε·mean_j(-log p_j), computed a block of rows at a time.

    `nn.functional.cross_entropy` keeps a (B·T, V) log-softmax for the backward pass and builds two more (B·T, V)
    tensors in it; here only the logits and one log-sum-exp per row are kept, and the backward pass writes
    softmax − smoothed target straight into the gradient, so no (B·T, V) float tensor exists beside the logits and
    their gradient. Blocks are computed in float32 whatever the logits' dtype (bf16 under autocast).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
        """Args: logits: (N, V); labels: (N,), -100 where no token is predicted. Returns: the summed loss."""
        valid = labels.ne(-100)
        labels = labels.clamp(min=0)
        rows_per_block = max(1, 2**22 // logits.shape[-1])  # about 16 MB of float32 at a time
        log_normalizers = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)  # (N,)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows_per_block):
            block = slice(start, start + rows_per_block)
            rows = logits[block].float()  # (n, V)
            log_normalizer = torch.logsumexp(rows, dim=-1)  # log Σ_j exp z_j: (n,)
            target = rows.gather(1, labels[block, None]).squeeze(1)  # z_y: (n,)
            per_token = (1 - epsilon) * (log_normalizer - target) + epsilon * (log_normalizer - rows.mean(dim=-1))
            total += per_token.masked_fill(~valid[block], 0.0).sum()
            log_normalizers[block] = log_normalizer
        ctx.save_for_backward(logits, labels, valid, log_normalizers)
        ctx.epsilon, ctx.rows_per_block = epsilon, rows_per_block
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, labels, valid, log_normalizers = ctx.saved_tensors
        epsilon, vocab_size = ctx.epsilon, logits.shape[-1]
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows_per_block):
            block = slice(start, start + ctx.rows_per_block)
            gradient = torch.exp(logits[block].float() - log_normalizers[block, None])  # softmax: (n, V)
            gradient -= epsilon / vocab_size
            gradient.scatter_add_(1, labels[block, None], gradient.new_full((gradient.shape[0], 1), epsilon - 1))
            gradient *= valid[block, None] * grad_total
            grad_logits[block] = gradient
        return grad_logits, None, None


def label_smoothed_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Cross-entropy of the target tokens, label-smoothed with ε_ls = `label_smoothing` (§5.4), per target token.

    Labels are aligned with the logits (the decoder inputs are the shifted labels), so there is no causal-LM shift.
    The summed loss is divided by `num_items_in_batch` when `Trainer` passes it (every target token of the update,
    across gradient accumulation and processes), else by the target tokens in `labels`. A batch without any target
    token (all labels -100) gives 0 and zero gradients, where a plain mean gives 0 / 0 = NaN and poisons training.

    Args:
        logits: (B, T, V). labels: (B, T), -100 where no token is predicted.
    """
    loss = SummedLabelSmoothedCrossEntropy.apply(
        logits.flatten(0, 1),
        labels.flatten().to(logits.device),
        label_smoothing,  # (B·T, V), (B·T,)
    )
    if num_items_in_batch is None:
        num_items_in_batch = labels.ne(-100).sum()
    if torch.is_tensor(num_items_in_batch):
        return loss / num_items_in_batch.to(loss.device).clamp(min=1)
    return loss / max(num_items_in_batch, 1)
