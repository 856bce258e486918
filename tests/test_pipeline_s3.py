"""End to end on a real S3 server (moto on loopback) and a real local Ray: auto and box mode, outputs in the
bucket, every input accounted for exactly once, Parquet valid against the schemas, COCO loads and its masks
equal the Parquet RLE bit for bit, and no credential anywhere in the outputs."""

from __future__ import annotations

import json
import os

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO

from ovsam.automatic import AutomaticConfig
from pipelines.config import LabelConfig
from pipelines.label import run_label
from pipelines.output import OutputStore
from ovsam import PromptError
from pipelines.predict import NO_PROMPTS
from schemas.annotations import decode_rle
from schemas.tables import (ANNOTATIONS_DIR, ANNOTATIONS_SCHEMA, COCO_FILE, IMAGES_DIR, IMAGES_SCHEMA, RUN_FILE,
                           SCHEMA_VERSION, SCHEMA_VERSION_KEY, STATUS_OK, validate)
from tests.pipeline_cases import image_cases

# Auto mode's point grid in these tests: 2×2 prompts keep the untrained model's CPU time per image small;
# what is under test is the pipeline around it.
TEST_POINTS_PER_SIDE = 2


@pytest.fixture(scope="module")
def input_bucket(s3_server):
    """``s3://label-inputs/images/`` holding every `image_cases` file (≥ 20, broken ones included)."""
    bucket = s3_server.make_bucket("label-inputs")
    fs = fsspec.filesystem("s3")
    cases = image_cases()
    assert len(cases) >= 20
    for case in cases:
        fs.pipe(f"{bucket}/images/{case.name}", case.data)
    return bucket, {f"{bucket}/images/{case.name}": case for case in cases}


def _check_tables(store: OutputStore) -> tuple[list[dict], list[dict]]:
    """Every committed part validates against its schema and carries the schema version; return all rows."""
    for folder, schema in ((IMAGES_DIR, IMAGES_SCHEMA), (ANNOTATIONS_DIR, ANNOTATIONS_SCHEMA)):
        for path in store.tables.files(folder):
            with store.fs.open(path, "rb") as source:
                table = pq.read_table(source)
            assert table.schema.metadata[SCHEMA_VERSION_KEY] == SCHEMA_VERSION.encode()
            validate(table, schema)
    return store.read_table(IMAGES_DIR).to_pylist(), store.read_table(ANNOTATIONS_DIR).to_pylist()


def _assert_no_secrets(store: OutputStore) -> None:
    secrets = [os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_SESSION_TOKEN"]]
    for path in store.fs.find(store.root):
        data = store.fs.cat_file(path)
        assert not any(secret.encode() in data for secret in secrets), path


def test_auto_mode_accounts_for_every_input(ray_cluster, input_bucket):
    bucket, cases = input_bucket
    config = LabelConfig(input=f"{bucket}/images", output=f"{bucket}/out-auto", mode="auto",
                         automatic=AutomaticConfig(points_per_side=TEST_POINTS_PER_SIDE), batch_size=4, coco=True)
    summary = run_label(config, show_progress=False)

    store = OutputStore(config.output)
    images, annotations = _check_tables(store)
    assert sorted(row["image_uri"] for row in images) == sorted(cases)  # each input exactly once
    for row in images:
        case = cases[row["image_uri"]]
        assert row["error_kind"] == case.error_kind, (case.name, row["error"])
        if case.error_kind:
            assert row["status"] == "error" and row["error"]
        else:
            assert row["status"] == STATUS_OK and (row["width"], row["height"]) == case.size, case.name
    ok_uris = {row["image_uri"] for row in images if row["status"] == STATUS_OK}
    assert all(a["image_uri"] in ok_uris and a["prompt_type"] == "grid" for a in annotations)
    assert sum(row["num_annotations"] for row in images) == len(annotations)

    assert summary.run_images == len(cases) and summary.run_ok == len(ok_uris)
    assert summary.run_errors == {kind: sum(c.error_kind == kind for c in cases.values())
                                  for kind in {c.error_kind for c in cases.values() if c.error_kind}}
    record = json.loads(store.fs.cat_file(store.path(RUN_FILE)))
    assert record["status"] == "complete" and record["model"]["trained"] is False
    coco = json.loads(store.fs.cat_file(store.path(COCO_FILE)))
    assert len(coco["images"]) == len(ok_uris) and "UNTRAINED" in coco["info"]["description"]
    _assert_no_secrets(store)

    again = run_label(config, show_progress=False)  # the same command again: everything is done
    assert (again.run_images, again.skipped_done) == (0, len(cases))
    assert len(store.read_table(IMAGES_DIR)) == len(cases)


def test_box_mode_from_a_manifest_with_coco_prompts(ray_cluster, input_bucket, tmp_path):
    bucket, cases = input_bucket
    fs = fsspec.filesystem("s3")
    chosen = ["normal_00.jpg", "normal_01.jpg", "exif_rotated.jpg", "cmyk.jpg", "normal_02.jpg", "normal_03.jpg",
              "zero_bytes.jpg"]
    fs.pipe(f"{bucket}/box/manifest.txt", "".join(f"{bucket}/images/{name}\n" for name in chosen).encode())
    boxes = {  # COCO [x, y, w, h]
        "normal_00.jpg": [[2, 3, 20, 15], [30, 10, 25, 30]],
        "normal_01.jpg": [[0, 0, 72, 52]],
        "exif_rotated.jpg": [[5, 40, 30, 35], [40, 70, 20, 30]],  # partly outside (48 wide): clipped
        "cmyk.jpg": [[10, 10, 30, 20]],
        "normal_02.jpg": [[1, 1, 10, 10], [500, 500, 10, 10]],  # second box wholly outside
        # normal_03.jpg: no prompt at all
    }
    coco_prompts = {"images": [{"id": i, "file_name": name} for i, name in enumerate(chosen)],
                    "annotations": [{"id": k, "image_id": chosen.index(name), "bbox": box}
                                    for k, (name, box) in enumerate((n, b) for n, bs in boxes.items() for b in bs)]}
    fs.pipe(f"{bucket}/box/prompts.json", json.dumps(coco_prompts).encode())
    config = LabelConfig(input=f"{bucket}/box/manifest.txt", output=f"{bucket}/out-box", mode="box",
                         prompts=f"{bucket}/box/prompts.json", batch_size=3, coco=True)
    run_label(config, show_progress=False)

    store = OutputStore(config.output)
    images, annotations = _check_tables(store)
    by_name = {row["image_uri"].rsplit("/", 1)[-1]: row for row in images}
    assert sorted(by_name) == sorted(chosen)
    assert by_name["normal_02.jpg"]["error_kind"] == PromptError.OUTSIDE_IMAGE
    assert "outside" in by_name["normal_02.jpg"]["error"]
    assert by_name["normal_03.jpg"]["error_kind"] == NO_PROMPTS
    assert by_name["zero_bytes.jpg"]["error_kind"] == "empty"
    for name in ("normal_00.jpg", "normal_01.jpg", "exif_rotated.jpg", "cmyk.jpg"):
        row = by_name[name]
        assert row["status"] == STATUS_OK and row["num_annotations"] == len(boxes[name])
        prompts = sorted(a["prompt"] for a in annotations if a["image_uri"] == row["image_uri"])
        width, height = row["width"], row["height"]
        expected = sorted(np.clip([x, y, x + w, y + h], 0, [width, height, width, height]).tolist()
                          for x, y, w, h in boxes[name])
        np.testing.assert_allclose(prompts, expected)

    local = tmp_path / "coco.json"
    local.write_bytes(store.fs.cat_file(store.path(COCO_FILE)))
    coco = COCO(str(local))
    assert len(coco.anns) == len(annotations) == 6
    for annotation in annotations:
        parquet_mask = decode_rle(annotation["segmentation"])
        coco_annotation = coco.anns[annotation["annotation_id"]]
        assert coco.imgs[coco_annotation["image_id"]]["file_name"] == annotation["image_uri"]
        np.testing.assert_array_equal(coco.annToMask(coco_annotation).astype(bool), parquet_mask)
        assert parquet_mask.shape == (by_name[annotation["image_uri"].rsplit("/", 1)[-1]]["height"],
                                      by_name[annotation["image_uri"].rsplit("/", 1)[-1]]["width"])
    _assert_no_secrets(store)


def test_a_presigned_url_is_fetched_as_given_and_stored_redacted(ray_cluster, s3_server, tmp_path, monkeypatch):
    """A manifest line that is a presigned URL to the loopback S3 server: the decode stage fetches it with its
    signature (the server's request recording shows it), the stored URI and any message carry it redacted."""
    import boto3
    import requests
    from botocore.config import Config
    from moto.moto_api import recorder

    from pipelines.decode import ReadAndDecode
    from tests.test_pipeline_inputs import _work

    bucket = s3_server.make_bucket("presigned-inputs")
    good = next(case for case in image_cases(3) if case.error_kind is None)
    fsspec.filesystem("s3").pipe(f"{bucket}/private/a.jpg", good.data)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, config=Config(signature_version="s3v4"))
    url = client.generate_presigned_url("get_object", Params={"Bucket": "presigned-inputs", "Key": "private/a.jpg"})
    signature = url.rsplit("X-Amz-Signature=", 1)[1]
    (tmp_path / "manifest.txt").write_text(url + "\n")

    items, _, _ = _work(str(tmp_path / "manifest.txt"))  # the run's own input rows (needs the session Ray)
    batch = {key: np.array([item[key] for item in items], dtype=object) for key in items[0]}
    monkeypatch.setattr(recorder, "_location", str(tmp_path / "recording"))
    requests.post(f"{s3_server.endpoint_url}/moto-api/recorder/start-recording", timeout=10)
    try:
        out = ReadAndDecode(endpoint_url=None, input_size=64)(batch)
    finally:
        requests.post(f"{s3_server.endpoint_url}/moto-api/recorder/stop-recording", timeout=10)
    fetched = [json.loads(line)["url"] for line in (tmp_path / "recording").read_text().splitlines()]
    assert fetched and all(signature in fetched_url for fetched_url in fetched)
    assert list(out["error_kind"]) == [""] and out["width"][0] == good.size[0]
    assert signature not in out["image_uri"][0] and "X-Amz-Signature=REDACTED" in out["image_uri"][0]
    assert "testing-access-key" not in out["image_uri"][0]
