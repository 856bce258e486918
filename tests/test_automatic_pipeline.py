"""Automatic mode through the real pipeline: the filters decide on what is written, and they are settings."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as ds
import pytest

from ovsam.automatic import AutomaticConfig
from pipelines.config import LabelConfig
from pipelines.label import LabelError, run_label
from schemas.annotations import decode_rle
from schemas.tables import ANNOTATIONS_DIR, RUN_FILE
from tests.pipeline_cases import shapes_image

# Large enough that the shipped model's grid finds masks below it on these images, so the filter is exercised.
MIN_AREA = 300


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("auto_images")
    # Non-square and of different sizes: the stored resolution is not the model's.
    for index, (width, height) in enumerate([(320, 200), (180, 300), (257, 257)]):
        shapes_image(100 + index, width, height).save(folder / f"img_{index}.png")
    return folder


def _config(images, output, **automatic) -> LabelConfig:
    return LabelConfig(input=str(images), output=str(output), preset="shapes", vocabulary="circle,square,triangle,star,hexagon",
                       automatic=AutomaticConfig(points_per_side=8, **automatic))


@pytest.mark.slow
def test_no_written_mask_is_empty_or_below_min_area(ray_cluster, images, tmp_path):
    output = tmp_path / "out"
    summary = run_label(_config(images, output, min_area=MIN_AREA, stability=0.5), show_progress=False)
    assert summary.run_ok == 3
    rows = ds.dataset(str(output / ANNOTATIONS_DIR), format="parquet").to_table().to_pylist()
    assert rows, "the grid found nothing: the test would prove nothing"
    for row in rows:
        pixels = int(decode_rle(row["segmentation"]).sum())
        assert pixels >= MIN_AREA and row["area"] == pixels
    # Without the filter the same images give smaller masks, so the filter (not luck) removed them.
    loose = tmp_path / "loose"
    run_label(_config(images, loose, min_area=1, stability=0.5), show_progress=False)
    loose_rows = ds.dataset(str(loose / ANNOTATIONS_DIR), format="parquet").to_table().to_pylist()
    assert min(int(decode_rle(r["segmentation"]).sum()) for r in loose_rows) < MIN_AREA

    record = json.loads((output / RUN_FILE).read_text())
    assert record["config"]["automatic"]["min_area"] == MIN_AREA
    assert record["config"]["automatic"]["stability"] == 0.5
    with pytest.raises(LabelError, match="automatic"):
        run_label(_config(images, output, min_area=MIN_AREA + 1, stability=0.5), show_progress=False)
