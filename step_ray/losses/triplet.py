"""Stage-1 losses (docs/method.md §4): triplet margin loss on squared distances plus an L2 penalty on z."""
from __future__ import annotations

import torch


def embedding_l2_penalty(*codes: torch.Tensor) -> torch.Tensor:
    """mean(z²) over all codes given: pulls the style space to zero mean and bounded spread."""
    return torch.cat([c.reshape(c.shape[0], -1) for c in codes], 0).pow(2).mean()


def triplet_loss(
    z_anchor: torch.Tensor,
    z_positive: torch.Tensor,
    z_negative: torch.Tensor,
    margin: float = 0.1,
    l2_weight: float = 0.01,
) -> tuple[torch.Tensor, dict[str, float]]:
    """max(‖z_a − z_p‖² − ‖z_a − z_n‖² + α, 0), averaged over the batch, + λ·mean(z²) of a, p, n."""
    d_pos = (z_anchor - z_positive).pow(2).sum(1)
    d_neg = (z_anchor - z_negative).pow(2).sum(1)
    hinge = torch.relu(d_pos - d_neg + margin)
    reg = embedding_l2_penalty(z_anchor, z_positive, z_negative)
    loss = hinge.mean() + l2_weight * reg
    return loss, {
        "loss": float(loss.detach()),
        "triplet": float(hinge.mean().detach()),
        "l2_reg": float(reg.detach()),
        # triplets that still violate the margin: the ones that carry gradient
        "active_fraction": float((hinge > 0).float().mean()),
    }
