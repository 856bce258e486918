"""The filter sweep reports what automatic mode itself would write for each setting."""

from __future__ import annotations

import dataclasses

import numpy as np
import pycocotools.mask as mask_utils

import ovsam
from jobs import automatic_sweep, shapes
from jobs.eval import mask_figures

SEED = 5  # no recipe seed: any images with objects will do


def test_sweep_figures_equal_those_of_automatic_mode_with_each_setting(tmp_path):
    predictor = ovsam.Predictor(ovsam.load_model("shapes", device="cpu"), cache_dir=tmp_path)
    drawn = [shapes.draw_image(SEED, index) for index in range(3)]
    images = [d.as_written() for d in drawn]
    truth = [[mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))) for _, mask in d.objects] for d in drawn]
    base = dataclasses.replace(ovsam.AutomaticConfig(points_per_side=8), **automatic_sweep.NO_FILTER)
    settings = [dataclasses.replace(base, stability=s, max_background=b, max_objects=m)
                for s, b, m in ((0.5, 1.0, 100), (0.85, 0.5, 100), (0.5, 1.0, 1))]
    rows = automatic_sweep.sweep(ovsam.AutomaticLabeller(predictor, base), iter(images), truth, settings)

    for row, config in zip(rows, settings):
        labeller = ovsam.AutomaticLabeller(predictor, config)
        written = [[mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))) for mask in labeller.generate(image).masks]
                   for image in images]
        expected = mask_figures(written, truth)
        assert row["recall"] == expected["recall"] and row["unmatched_per_image"] == expected["unmatched_per_image"]
        assert row["masks_per_image"] == sum(map(len, written)) / len(images)
    assert rows[2]["masks_per_image"] <= 1 < rows[0]["masks_per_image"]
