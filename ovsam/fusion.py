"""Open-vocabulary fusion of the head's and CLIP's class probabilities (as in FC-CLIP and the release).

The head was trained on the seen (base) classes and is confident there; CLIP generalises to the rest.
Per class, the fused probability is the geometric mean q^(1-w) * c^w with w = alpha for seen classes and
w = beta for unseen ones; the background column counts as seen.
"""

from __future__ import annotations

import torch

from .config import FusionConfig

# The release blanks classes that are neither base nor novel (e.g. 15 of COCO's 80 in the 48/17 split)
# with this logit; only the parity check asks for it (`excluded`), the product labels every class.
EXCLUDED_CLASS_LOGIT = -1000.0


def fuse_logits(
    query_logits: torch.Tensor,
    clip_logits: torch.Tensor,
    clip_valid: torch.Tensor,
    config: FusionConfig,
    seen: torch.Tensor | None = None,
    excluded: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused log-probabilities [N, K + 1] (last column background).

    query_logits, clip_logits: [N, K + 1]; clip_valid: [N] bool, False where the CLIP region is empty (its
    logits are then ignored); seen: [K] bool, True for classes the head was trained on (None: no class
    counts as seen, every class gets weight beta); excluded: [K] bool, classes forced to -1000.
    Computed in log space, which equals log(q^(1-w) c^w) without underflowing to -inf.
    """
    n, k_plus_1 = query_logits.shape
    log_q = torch.log_softmax(query_logits.float(), dim=-1)
    log_c = torch.log_softmax(clip_logits.float(), dim=-1)
    seen_with_background = torch.ones(k_plus_1, dtype=torch.bool, device=query_logits.device)
    if seen is not None:
        seen_with_background[:-1] = seen.to(query_logits.device)
    else:
        seen_with_background[:-1] = False
    weight = torch.where(seen_with_background, config.alpha, config.beta)
    weight = weight[None, :] * clip_valid.float()[:, None]
    fused = (1 - weight) * log_q + weight * log_c
    if excluded is not None:
        columns = torch.zeros(k_plus_1, dtype=torch.bool, device=fused.device)
        columns[:-1] = excluded.to(fused.device)
        fused = fused.masked_fill(columns, EXCLUDED_CLASS_LOGIT)
    return fused
