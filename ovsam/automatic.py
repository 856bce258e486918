"""Automatic mode ("everything"): label every object of an image without prompts from the user.

A regular grid of point prompts is decoded in batches against one image embedding, by the head alone.
Candidates are then kept in order of cost:

1. on the low-resolution logits (256 x 256 for a 1024 input, cropped to the image): mask stability, and
   the head's own probability that the region is background (the head is the part trained on "no
   object"; CLIP has none: its background logit is a constant 0 against cosine x 100, so the fused
   background probability is near 0 for any region);
2. at the resolution the mask is stored at (the original image): area, so that no written mask is
   empty or a speck, whatever the ratio between the image and the model input;
3. duplicates and fragments: greedy non-maximum suppression on mask IoU (boxes cannot tell two
   overlapping shapes apart, nor a fragment from the object around it), best quality first;
4. only the survivors go through CLIP's region branch and the label fusion, so the CLIP cost grows with
   the number of objects, not with the grid; then the label-score filter and the cap.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from segment_anything.utils.amg import build_point_grid, calculate_stability_score

from .clip2sam import MASK_LOGIT_THRESHOLD, HeadOutput, classify
from .config import AutomaticConfig
from .model import ImageFeatures
from .predictor import Prediction, Predictor
from .transforms import ImageFrame, ResizedImage, upscale_masks

# SAM's stability score is the IoU of a mask thresholded at logit -1 and +1. SAM tunes 0.92 on
# full-resolution logits; here it is measured on the 256 x 256 logits inside the image (upscaling all
# 1024 candidates first would cost more than the decoder). Bilinear upscaling keeps the ratio of the two
# areas up to boundary pixels, so the two scores agree closely for masks larger than a few low-res pixels.
STABILITY_OFFSET = 1.0
# Candidate masks upscaled to full resolution at a time to measure their stored area: bounds memory.
AREA_CHUNK = 16


class AutomaticLabeller:
    def __init__(self, predictor: Predictor, config: AutomaticConfig | None = None) -> None:
        self.predictor = predictor
        self.config = config or AutomaticConfig()

    def generate(self, image: np.ndarray | ResizedImage) -> Prediction:
        """All objects of one image (as `Predictor.embed_images` takes it); `prompts` holds the grid point
        (x, y) of each, original pixels."""
        return self.generate_images([image])[0]

    def generate_images(self, images: Sequence[np.ndarray | ResizedImage]) -> list[Prediction]:
        features, frames = self.predictor.embed_images(images)
        return [self._generate(features, frame, row) for row, frame in enumerate(frames)]

    def _generate(self, features: ImageFeatures, frame: ImageFrame, row: int) -> Prediction:
        cfg = self.config
        candidates, points, quality = self.mask_candidates(features, frame, row)
        keep = select_masks(candidates.low_res_masks, quality, frame, cfg)
        candidates, points = candidates.select(keep), points[keep.cpu().numpy()]
        decoded = self.predictor.recognise(features, frame, row, candidates)
        probs = torch.softmax(decoded.fused_logits.float(), dim=-1)
        labelled = probs[:, :-1].amax(dim=-1) >= cfg.min_score
        order = torch.nonzero(labelled).flatten()[: cfg.max_objects]
        return self.predictor.to_prediction(decoded.select(order), frame, "grid", points[order.cpu().numpy()])

    def mask_candidates(self, features: ImageFeatures, frame: ImageFrame,
                        row: int) -> tuple[HeadOutput, np.ndarray, torch.Tensor]:
        """The grid's stable object masks: head outputs, grid points [M, 2] xy (original pixels), quality [M].

        Quality ranks duplicates: stability times the head's probability that the region is an object.
        """
        cfg = self.config
        h, w = frame.original_size
        grid = (build_point_grid(cfg.points_per_side) * np.array([w, h], dtype=np.float64)).astype(np.float32)
        kept, kept_points, kept_quality = [], [], []
        for start in range(0, len(grid), cfg.points_per_batch):
            batch = grid[start:start + cfg.points_per_batch]
            head = self.predictor.decode_masks(features, frame, row, batch[:, None, :], "point")
            stability = stability_scores(head.low_res_masks, frame)
            objectness = 1 - head_background_probs(head, self.predictor.class_embeddings)
            keep = (stability >= cfg.stability) & (objectness >= 1 - cfg.max_background)
            kept.append(head.select(keep))
            kept_points.append(batch[keep.cpu().numpy()])
            kept_quality.append((stability * objectness)[keep])
        return HeadOutput.concat(kept), np.concatenate(kept_points), torch.cat(kept_quality)


def stability_scores(low_res_masks: torch.Tensor, frame: ImageFrame) -> torch.Tensor:
    """[N, 1, s, s] low-res logits -> [N] SAM stability score inside the image (0 for an empty mask)."""
    inside = _inside_image(low_res_masks, frame).float()
    score = calculate_stability_score(inside, MASK_LOGIT_THRESHOLD, STABILITY_OFFSET)
    return torch.nan_to_num(score, nan=0.0)


def head_background_probs(head: HeadOutput, class_embeddings: torch.Tensor) -> torch.Tensor:
    """[N] background probability of the head's own classifier (no CLIP), for ranking candidates."""
    return torch.softmax(classify(head.roi_embeddings, class_embeddings), dim=-1)[:, -1]


def stored_areas(low_res_masks: torch.Tensor, frame: ImageFrame) -> torch.Tensor:
    """[N, 1, s, s] low-res logits -> [N] int64 pixel count of each mask as stored (original frame)."""
    areas = [(upscale_masks(low_res_masks[start:start + AREA_CHUNK], frame) > MASK_LOGIT_THRESHOLD).sum((1, 2))
             for start in range(0, len(low_res_masks), AREA_CHUNK)]
    return torch.cat(areas) if areas else torch.zeros(0, dtype=torch.int64, device=low_res_masks.device)


def select_masks(low_res_masks: torch.Tensor, quality: torch.Tensor, frame: ImageFrame,
                 config: AutomaticConfig) -> torch.Tensor:
    """Indices of the candidates to keep, best first: stored area >= min_area, then mask NMS."""
    large = torch.nonzero(stored_areas(low_res_masks, frame) >= config.min_area).flatten()
    large = large[quality[large].argsort(descending=True)]
    binary = _inside_image(low_res_masks[large], frame) > MASK_LOGIT_THRESHOLD
    return large[mask_nms(binary, config.nms_iou)]


def mask_nms(masks: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy suppression over [N, h, w] bool masks sorted best first -> indices of the kept ones.

    A mask is dropped when a kept, better mask overlaps it by mask IoU above `threshold` (a duplicate) or
    covers more than `threshold` of its own area (a fragment of the same object).
    """
    n = len(masks)
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=masks.device)
    flat = masks.flatten(1).float()
    intersection = flat @ flat.T
    area = flat.sum(dim=1)
    iou = intersection / (area[:, None] + area[None, :] - intersection).clamp(min=1)
    covered = intersection / area[None, :].clamp(min=1)  # [i, j]: share of mask j inside mask i
    conflict = ((iou > threshold) | (covered > threshold)).cpu().numpy()
    suppressed = np.zeros(n, dtype=bool)
    kept = []
    for i in range(n):
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed |= conflict[i]
    return torch.as_tensor(kept, dtype=torch.long, device=masks.device)


def _inside_image(low_res_masks: torch.Tensor, frame: ImageFrame) -> torch.Tensor:
    """[N, 1, s, s] -> [N, rh, rw]: the low-res logits over the image, without the padding."""
    scale = low_res_masks.shape[-1] / frame.input_size
    rh, rw = (max(1, round(side * scale)) for side in frame.resized_size)
    return low_res_masks[:, 0, :rh, :rw].float()
