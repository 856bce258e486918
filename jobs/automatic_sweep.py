"""Choose automatic mode's filters on a validation set: recall and false masks for each filter setting.

    python -m jobs.automatic_sweep --preset MODEL --images DIR --gt instances.json \
        --stability 0.7,0.8,0.85,0.9 --max-background 0.5,1

The grid of every image is decoded once (`AutomaticLabeller.mask_candidates` with no filter); each setting
then applies its stability and background thresholds and `select_masks` (stored area, mask NMS) to those
candidates, exactly as `ovsam-batch label` does, and its kept masks, upscaled to the original image as they
are stored, are compared with the ground truth by `jobs.eval.mask_figures`: ``recall`` (objects with a
mask of IoU >= 0.5), ``unmatched_per_image`` (masks to delete) and ``masks_per_image``. The figures are
class-agnostic: CLIP's labelling and ``--min-score`` come after these filters and are left out (with the
default ``--min-score 0`` they drop nothing). Pick the setting on images the model never trained on and
report the final figures on other held-out images, through ``label`` and ``eval``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterable

import click
import numpy as np
import pycocotools.mask as mask_utils
import torch
from tqdm import tqdm

import ovsam
from jobs.data import join, read_image
from jobs.eval import load_ground_truth, mask_figures
from ovsam.automatic import (AutomaticConfig, AutomaticLabeller, head_background_probs, select_masks,
                             stability_scores)
from ovsam.clip2sam import MASK_LOGIT_THRESHOLD
from ovsam.transforms import upscale_masks

# Every candidate of the grid passes these: the sweep applies its own thresholds afterwards.
NO_FILTER = {"stability": 0.0, "max_background": 1.0}


def _float_list(_ctx, _param, value: str) -> list[float]:
    try:
        values = [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise click.BadParameter(f"expected numbers in [0, 1], got {value!r}")
    return values


def _rles(binary_masks: torch.Tensor) -> list[dict]:
    return [mask_utils.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8))) for mask in binary_masks]


def sweep(labeller: AutomaticLabeller, images: Iterable[np.ndarray], truth: list[list[dict]],
          settings: list[AutomaticConfig]) -> list[dict]:
    """For each setting, `mask_figures` of what automatic mode keeps on ``images`` (RGB uint8, read one at a
    time; truth[i]: image i's ground-truth RLEs), plus ``masks_per_image``."""
    kept_rles: list[list[list[dict]]] = [[] for _ in settings]
    for image in tqdm(images, desc="images", unit="img", total=len(truth)):
        features, frames = labeller.predictor.embed_images([image])
        frame = frames[0]
        candidates, _, _ = labeller.mask_candidates(features, frame, 0)
        stability = stability_scores(candidates.low_res_masks, frame)
        objectness = 1 - head_background_probs(candidates, labeller.predictor.class_embeddings)
        for per_setting, config in zip(kept_rles, settings):
            passed = torch.nonzero((stability >= config.stability)
                                   & (objectness >= 1 - config.max_background)).flatten()
            keep = passed[select_masks(candidates.low_res_masks[passed], (stability * objectness)[passed], frame,
                                       config)][: config.max_objects]
            masks = upscale_masks(candidates.low_res_masks[keep], frame) > MASK_LOGIT_THRESHOLD
            per_setting.append(_rles(masks))
    rows = []
    for config, predicted in zip(settings, kept_rles):
        figures = mask_figures(predicted, truth)
        rows.append({"stability": config.stability, "max_background": config.max_background,
                     "nms_iou": config.nms_iou, "min_area": config.min_area, **figures,
                     "masks_per_image": sum(map(len, predicted)) / max(1, len(predicted))})
    return rows


@click.command()
@click.option("--preset", required=True, help="Model: preset name, preset JSON or model directory.")
@click.option("--images", required=True, help="Folder the ground truth's file_names are relative to (local or s3://).")
@click.option("--gt", "ground_truth", required=True, help="COCO instances JSON of those images.")
@click.option("--stability", default="0.7,0.8,0.85,0.9", show_default=True, callback=_float_list,
              help="Stability thresholds to try (comma list).")
@click.option("--max-background", default="0.5,1", show_default=True, callback=_float_list,
              help="Background-probability limits to try (comma list; 1 = off).")
@click.option("--nms-iou", default=AutomaticConfig.nms_iou, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--min-area", default=AutomaticConfig.min_area, show_default=True, type=click.IntRange(min=1))
@click.option("--points-per-side", default=AutomaticConfig.points_per_side, show_default=True,
              type=click.IntRange(min=1))
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Use the first N images of the ground truth.")
def main(preset: str, images: str, ground_truth: str, stability: list[float], max_background: list[float],
         nms_iou: float, min_area: int, points_per_side: int, limit: int | None) -> None:
    """Recall and false masks of automatic mode for each stability / background setting (one table)."""
    coco = load_ground_truth(ground_truth)
    image_ids = sorted(coco.imgs)[:limit]
    pixels = (read_image(join(images, coco.imgs[i]["file_name"])) for i in image_ids)
    truth = [[coco.annToRLE(ann) for ann in coco.imgToAnns[i]] for i in image_ids]
    base = dataclasses.replace(AutomaticConfig(points_per_side=points_per_side, nms_iou=nms_iou, min_area=min_area),
                               **NO_FILTER)
    labeller = AutomaticLabeller(ovsam.Predictor(ovsam.load_model(preset)), base)
    settings = [dataclasses.replace(base, stability=s, max_background=b)
                for s, b in itertools.product(stability, max_background)]
    rows = sweep(labeller, pixels, truth, settings)
    click.echo(f"{len(image_ids)} images, {sum(map(len, truth))} objects")
    click.echo(f"{'stability':>10}{'max_background':>16}{'recall':>8}{'unmatched/img':>15}{'masks/img':>11}")
    for row in rows:
        recall = "-" if row["recall"] is None else f"{row['recall']:.3f}"
        click.echo(f"{row['stability']:>10.2f}{row['max_background']:>16.2f}{recall:>8}"
                   f"{row['unmatched_per_image']:>15.2f}{row['masks_per_image']:>11.2f}")
    click.echo(json.dumps(rows))


if __name__ == "__main__":
    main()
