"""Loss functions of tensors (no models, no state); the trainer sums the weighted terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stayaligned.templates.render import IGNORE_INDEX


def shifted_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood (batch, seq-1), zero where the label is ignored.

    Position t predicts label t+1, as in causal LM training.
    """
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        target.clamp(min=0).reshape(-1),
        reduction="none",
    ).view(target.shape)
    return nll * mask


def token_mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over all labelled tokens of the batch (the SFT loss)."""
    n = (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
    return shifted_token_nll(logits, labels).sum() / n


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-prob of each label token, aligned with `labels` (batch, seq), 0.0 where ignored.

    The value at position t is log p(labels[t] | tokens before t), read from logits[t - 1];
    position 0 is never a label after the shift and holds 0.0.
    """
    target = labels[:, 1:]
    logp = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    logp[:, 1:] = torch.where(target != IGNORE_INDEX, -shifted_token_nll(logits, labels), 0.0)
    return logp


# ---------------------------------------------------------------- STR (methods.md 3.3)

STR_VARIANTS = ("logit", "logprob", "one_sided")


def turn_index(mask: torch.Tensor) -> torch.Tensor:
    """1-based index of each True position within its contiguous run of Trues (one run per
    assistant turn), 0 elsewhere.

    >>> turn_index(torch.tensor([[0, 1, 1, 1, 0, 0, 1, 1]], dtype=torch.bool)).tolist()
    [[0, 1, 2, 3, 0, 0, 1, 2]]
    """
    count = mask.long().cumsum(dim=1)
    before = torch.where(mask, torch.zeros_like(count), count).cummax(dim=1).values
    return (count - before) * mask


def str_positions(labels: torch.Tensor, first_positions: int | None = None) -> torch.Tensor:
    """Bool (batch, seq): the positions P whose next-token logits STR anchors.

    P = positions t whose label at t + 1 is a response token: the response positions plus the
    last prompt position (the one that predicts the first response token). `first_positions`
    keeps only the first N of them in each assistant turn (each contiguous run of P).

    >>> str_positions(torch.tensor([[-100, -100, 7, 8, -100]])).int().tolist()
    [[0, 1, 1, 0, 0]]
    >>> str_positions(torch.tensor([[-100, -100, 7, 8, -100]]), first_positions=1).int().tolist()
    [[0, 1, 0, 0, 0]]
    >>> str_positions(torch.tensor([[-100, 7, 8, -100, -100, 9, 9]]), first_positions=2).int().tolist()
    [[1, 1, 0, 0, 1, 1, 0]]
    """
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    if first_positions is not None:
        mask &= turn_index(mask) <= first_positions
    return mask


def str_penalty(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    token_ids: torch.Tensor,
    variant: str = "logit",
    first_positions: int | None = None,
    ref_gathered: bool = False,
) -> torch.Tensor:
    """R_STR: mean over positions P and salient tokens S of a distance between the trained and
    the reference model's scores for S. With `ref_gathered`, `ref_logits` holds only the |S|
    columns, in `token_ids` order (not possible for the "logprob" variant).

    variant "logit": (z - z0)^2; "logprob": (log p - log p0)^2; "one_sided": relu(z0 - z)^2
    (penalises only a falling refusal logit). Only the |S| columns are compared; the
    log-partition of the "logprob" variant uses the full vocabulary. 0 when P is empty.
    """
    if variant not in STR_VARIANTS:
        raise ValueError(f"STR variant {variant!r}: choose one of {', '.join(STR_VARIANTS)}")
    if ref_gathered and variant == "logprob":
        raise ValueError("STR: the logprob variant needs the reference's full-vocabulary logits")
    expected = (*logits.shape[:2], len(token_ids)) if ref_gathered else logits.shape
    if tuple(ref_logits.shape) != tuple(expected) or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"STR: logits {tuple(logits.shape)}, reference {tuple(ref_logits.shape)} and labels "
            f"{tuple(labels.shape)} do not match"
        )
    mask = str_positions(labels, first_positions)
    z, z0 = logits[mask].float(), ref_logits[mask].float()  # (|P|, vocab)
    token_ids = token_ids.to(z.device)
    zs, z0s = z[:, token_ids], (z0 if ref_gathered else z0[:, token_ids])
    if variant == "logprob":
        zs = zs - z.logsumexp(dim=-1, keepdim=True)
        z0s = z0s - z0.logsumexp(dim=-1, keepdim=True)
    gap = F.relu(z0s - zs) if variant == "one_sided" else zs - z0s
    return gap.pow(2).sum() / max(gap.numel(), 1)


# ---------------------------------------------------------------- constrained SFT (methods.md 5.1)


def beta_schedule(
    n: int,
    beta: float = 0.1,
    bias_length: int = 5,
    bias_factor: float = 20.0,
    first_token_bias_factor: float = 5.0,
) -> list[float]:
    """beta_t for response tokens t = 1..n, as Qi et al.'s `get_beta_list`: the first
    `bias_length` tokens get beta * bias_factor, except the first, which gets
    beta * first_token_bias_factor; later tokens get beta.

    >>> beta_schedule(7)
    [0.5, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1]
    >>> beta_schedule(2, bias_length=0)
    [0.1, 0.1]
    """
    betas = [beta * bias_factor if t < bias_length else beta for t in range(n)]
    if n and bias_length:
        betas[0] = beta * first_token_bias_factor
    return betas


def constrained_token_weights(
    logp: torch.Tensor, ref_logp: torch.Tensor, betas: torch.Tensor, min_weight: float = 1e-3
) -> torch.Tensor:
    """w_t = max(2 (1 - sigmoid(beta_t (logp_t - ref_logp_t))), min_weight), detached: the
    gradient weight of Qi et al.'s token-wise constrained objective (their Appendix D.2)."""
    weights = 2.0 * (1.0 - torch.sigmoid(betas * (logp - ref_logp)))
    return weights.clamp(min=min_weight).detach()


def constrained_sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logp: torch.Tensor,
    *,
    beta: float = 0.1,
    bias_length: int = 5,
    bias_factor: float = 20.0,
    first_token_bias_factor: float = 5.0,
    min_weight: float = 1e-3,
    return_nll: bool = False,
    num_items: torch.Tensor | int | None = None,
):
    """Mean over all response tokens of the batch of -w_t * log pi(y_t); with `return_nll`,
    also the plain token-mean NLL of the same tokens (for logging, at no extra cost). With
    `num_items` (the loss tokens of the whole optimiser step), both are sums over this batch's
    tokens divided by `num_items` instead: shares that add up to the step's token mean, as
    transformers scales cross-entropy under gradient accumulation.

    `ref_logp` is aligned like `label_logprobs` (value at t scores labels[t]). The response
    index t restarts at 1 at the first labelled token of each assistant turn (each contiguous
    run of labels), so every turn's first tokens get the large beta_t; with one assistant turn
    this is the reference code's index.
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    logp = label_logprobs(logits, labels)[:, 1:]
    ref = ref_logp[:, 1:].to(device=logp.device, dtype=logp.dtype)
    index = turn_index(mask)  # 1-based response-token index within its turn, 0 elsewhere
    table = [0.0] + beta_schedule(mask.shape[1], beta, bias_length, bias_factor,
                                  first_token_bias_factor)
    betas = torch.tensor(table, dtype=logp.dtype, device=logp.device)[index]
    weights = constrained_token_weights(logp, ref, betas, min_weight)
    count = mask.sum().clamp(min=1) if num_items is None else num_items
    loss = -(weights * logp * mask).sum() / count
    if return_nll:
        return loss, -(logp * mask).sum().detach() / count
    return loss
