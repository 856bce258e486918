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
    # Without the filter first: the threshold is the median stored area of what the grid finds, so the
    # filter has masks to remove whatever model is shipped.
    loose = tmp_path / "loose"
    run_label(_config(images, loose, min_area=1, stability=0.5), show_progress=False)
    loose_areas = [int(decode_rle(r["segmentation"]).sum())
                   for r in ds.dataset(str(loose / ANNOTATIONS_DIR), format="parquet").to_table().to_pylist()]
    assert len(loose_areas) >= 2, "the grid found too little: the test would prove nothing"
    min_area = int(np.median(loose_areas))
    assert min(loose_areas) < min_area

    output = tmp_path / "out"
    summary = run_label(_config(images, output, min_area=min_area, stability=0.5), show_progress=False)
    assert summary.run_ok == 3
    rows = ds.dataset(str(output / ANNOTATIONS_DIR), format="parquet").to_table().to_pylist()
    assert rows and len(rows) < len(loose_areas)
    for row in rows:
        pixels = int(decode_rle(row["segmentation"]).sum())
        assert pixels >= min_area and row["area"] == pixels

    record = json.loads((output / RUN_FILE).read_text())
    assert record["config"]["automatic"]["min_area"] == min_area
    assert record["config"]["automatic"]["stability"] == 0.5
    with pytest.raises(LabelError, match="automatic"):
        run_label(_config(images, output, min_area=min_area + 1, stability=0.5), show_progress=False)
