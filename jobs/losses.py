"""Losses of the release's CLIP2SAM training: class cross-entropy with a light background class, and mask
BCE + dice on points sampled where the prediction is uncertain (Mask2Former's scheme, which the release's
head uses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLS_WEIGHT = 2.0
MASK_WEIGHT = 5.0
DICE_WEIGHT = 5.0
# The release's background class weight: Mask2Former's no-object weight, which balances ~100 queries, most
# of them matched to no object, against the few that are.
BACKGROUND_CLASS_WEIGHT = 0.1
# Background prompts of CLIP2SAM (``--background-points R``) are a chosen share R of the prompts: R sets the
# balance, so their class term counts in full. At 0.1 they were 5 % of the class loss at R = 0.5 and the
# head of the shapes model called 0.5 % of them background after 1,000 steps. The release has no background
# targets in CLIP2SAM, so this weight changes nothing for its recipe.
BACKGROUND_PROMPT_WEIGHT = 1.0
# Points per mask and the sampling scheme of the release's head: 112 * 112 points, drawn from 3x as many
# random candidates, 75 % of them the most uncertain candidates (|logit| smallest), the rest uniform.
NUM_POINTS = 112 * 112
OVERSAMPLE_RATIO = 3.0
IMPORTANCE_SAMPLE_RATIO = 0.75
# Laplace smoothing of the dice ratio ("naive" dice with eps 1 in mmdet).
DICE_EPS = 1.0


def point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of maps [N, C, H, W] at coords [N, P, 2] (x, y in 0..1 of the map) -> [N, C, P]."""
    return F.grid_sample(maps, 2.0 * coords[:, :, None, :] - 1.0, align_corners=False)[..., 0]


def uncertain_points(logits: torch.Tensor, num_points: int) -> torch.Tensor:
    """Sample coords [N, num_points, 2] in 0..1 for mask logits [N, 1, h, w]: most uncertain + uniform."""
    n = logits.shape[0]
    candidates = torch.rand(n, int(num_points * OVERSAMPLE_RATIO), 2, device=logits.device)
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()
    num_uncertain = int(IMPORTANCE_SAMPLE_RATIO * num_points)
    index = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = torch.gather(candidates, 1, index[..., None].expand(-1, -1, 2))
    uniform = torch.rand(n, num_points - num_uncertain, 2, device=logits.device)
    return torch.cat([chosen, uniform], dim=1)


def mask_losses(logits: torch.Tensor, targets: torch.Tensor, num_points: int = NUM_POINTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, dice) of mask logits [N, 1, h, w] against binary targets [N, 1, H, W] (any resolution, same frame).

    BCE is averaged over all sampled points, dice over masks.
    """
    with torch.no_grad():
        coords = uncertain_points(logits, num_points)
        target_points = point_sample(targets.float(), coords)[:, 0]
    logit_points = point_sample(logits, coords)[:, 0]
    bce = F.binary_cross_entropy_with_logits(logit_points, target_points)
    probs = logit_points.sigmoid()
    dice = 1 - (2 * (probs * target_points).sum(1) + DICE_EPS) / (probs.sum(1) + target_points.sum(1) + DICE_EPS)
    return bce, dice.mean()


def classification_loss(logits: torch.Tensor, labels: torch.Tensor,
                        background_weight: float = BACKGROUND_CLASS_WEIGHT) -> torch.Tensor:
    """Cross-entropy over K classes + background (last column, weight `background_weight`), averaged by the
    target weights.

    logits: [N, K + 1]; labels: [N] int64 in 0..K (K = background).
    """
    weight = torch.ones(logits.shape[1], device=logits.device)
    weight[-1] = background_weight
    return F.cross_entropy(logits, labels, weight=weight)
