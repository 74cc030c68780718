"""`soft_an`: assume-negative with a soft target for the unobserved labels."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def soft_an(logits: Tensor, targets: Tensor, observed: Tensor, q: float = 0.05) -> Tensor:
    """BCE where every unobserved label has the soft target `q` instead of 0.

    Args:
        logits: (B, C) raw scores.
        targets: (B, C) in [0, 1]; used where `observed`.
        observed: (B, C) bool.
        q: target of an unobserved label (0 gives the assume-negative loss `an`).

    Returns:
        The mean over all B x C entries (a scalar). `binary_cross_entropy_with_logits` is the
        softplus form, stable for any logit.
    """
    y = targets.float().where(observed, targets.new_full((), q))       # (B, C)
    return F.binary_cross_entropy_with_logits(logits.float(), y)
