"""Automatic mode ("everything"): label every object of an image without prompts from the user.

A regular grid of point prompts is decoded in batches against one image embedding; candidates are
filtered by mask stability, by the probability of being an object of the vocabulary at all (the
background column the release computes but never uses), by label score and area; near-duplicates are
removed by non-maximum suppression on the mask boxes. Only the survivors are upscaled to full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from segment_anything.utils.amg import build_point_grid, calculate_stability_score
from torchvision.ops import nms

from .clip2sam import MASK_LOGIT_THRESHOLD
from .model import Decoded
from .predictor import Prediction, Predictor
from .transforms import ImageFrame


@dataclass(frozen=True)
class AutomaticConfig:
    points_per_side: int = 32  # SAM's default grid, 32 x 32 = 1024 prompts per image
    points_per_batch: int = 64  # prompts decoded together
    # SAM's defaults: a mask is stable if its IoU between logit thresholds -1 and +1 is at least 0.92.
    stability_score_thresh: float = 0.92
    stability_score_offset: float = 1.0
    max_background_prob: float = 0.5  # drop regions more likely background than any class
    min_score: float = 0.0  # minimum probability of the label
    min_area_fraction: float = 1e-4  # of the image area; drops specks
    nms_iou_thresh: float = 0.7  # SAM's box-NMS threshold between candidates
    max_objects: int = 200  # keep the best this many per image

    def __post_init__(self) -> None:
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ValueError("points_per_side and points_per_batch must be positive")
        if not 0.0 <= self.nms_iou_thresh <= 1.0:
            raise ValueError("nms_iou_thresh must be in [0, 1]")


class AutomaticLabeller:
    def __init__(self, predictor: Predictor, config: AutomaticConfig | None = None) -> None:
        self.predictor = predictor
        self.config = config or AutomaticConfig()

    def generate(self, image: np.ndarray) -> Prediction:
        """All objects of one RGB uint8 [H, W, 3] image; `prompts` holds the grid point (x, y) of each."""
        return self.generate_images([image])[0]

    def generate_images(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        features, frames = self.predictor.embed_images(images)
        return [self._generate(features, frame, row) for row, frame in enumerate(frames)]

    def _generate(self, features, frame: ImageFrame, row: int) -> Prediction:
        cfg = self.config
        h, w = frame.original_size
        # Grid cell centres in original pixels, one point per prompt: [M, 1, 2].
        points = (build_point_grid(cfg.points_per_side) * np.array([w, h], dtype=np.float64))
        points = points.astype(np.float32)[:, None, :]
        kept: list[Decoded] = []
        kept_points: list[np.ndarray] = []
        kept_quality: list[torch.Tensor] = []
        for start in range(0, len(points), cfg.points_per_batch):
            batch = points[start:start + cfg.points_per_batch]
            decoded = self.predictor.decode(features, frame, row, batch, "point")
            keep, quality = self._filter(decoded, frame)
            if keep.any():
                kept.append(decoded.select(keep))
                kept_points.append(batch[keep.cpu().numpy(), 0])
                kept_quality.append(quality[keep])
        if not kept:
            return self.predictor.to_prediction(_empty_like(decoded), frame, "grid", np.zeros((0, 2), np.float32))
        candidates = Decoded.concat(kept)
        quality = torch.cat(kept_quality)
        order = nms(candidates.mask_boxes.float(), quality.float(), cfg.nms_iou_thresh)[: cfg.max_objects]
        return self.predictor.to_prediction(candidates.select(order), frame, "grid",
                                            np.concatenate(kept_points)[order.cpu().numpy()])

    def _filter(self, decoded: Decoded, frame: ImageFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean keep mask and ranking quality (stability x objectness) of a batch of candidates.

        Stability and area are measured on the low-resolution logits inside the image (not the padding),
        which avoids upscaling candidates that are dropped anyway.
        """
        cfg = self.config
        low = decoded.low_res_masks[:, 0].float()
        scale = low.shape[-1] / frame.input_size
        rh, rw = (max(1, round(s * scale)) for s in frame.resized_size)
        low = low[:, :rh, :rw]
        stability = calculate_stability_score(low, MASK_LOGIT_THRESHOLD, cfg.stability_score_offset)
        probs = torch.softmax(decoded.fused_logits.float(), dim=-1)
        background = probs[:, -1]
        score = probs[:, :-1].amax(dim=-1)
        area_fraction = (low > MASK_LOGIT_THRESHOLD).flatten(1).float().mean(dim=1)
        keep = (stability >= cfg.stability_score_thresh) & (background <= cfg.max_background_prob) \
            & (score >= cfg.min_score) & (area_fraction >= cfg.min_area_fraction)
        return keep, stability * (1 - background)


def _empty_like(decoded: Decoded) -> Decoded:
    return decoded.select(torch.zeros(0, dtype=torch.long, device=decoded.low_res_masks.device))
