"""`ovsam-batch eval` on tiny hand-made ground truth whose answers are worked out by hand below."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
import pytest
from click.testing import CliRunner

from jobs import eval as evaluation
from ovsam_batch.cli import main as cli
from schemas.tables import ANNOTATIONS_SCHEMA, IMAGES_SCHEMA

SIDE = 10


def _mask(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[rows, cols] = 1
    return mask


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _gt_ann(ann_id: int, image_id: int, category_id: int, mask: np.ndarray) -> dict:
    rle = _rle(mask)
    x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask)))
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": rle,
            "bbox": [float(x), float(y), float(w), float(h)], "area": int(mask.sum()), "iscrowd": 0}


def _pred(uri: str, index: int, mask: np.ndarray, label: str, prompt: list[float], prompt_type: str = "box",
          score: float = 0.9) -> dict:
    x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask)))
    return {"image_uri": uri, "annotation_id": index, "bbox": [float(x), float(y), float(w), float(h)],
            "segmentation": _rle(mask), "area": int(mask.sum()), "label": label, "label_id": 0,
            "score": score, "topk_labels": [label], "topk_label_ids": [0], "topk_scores": [score],
            "prompt_type": prompt_type, "prompt": prompt}


def _image_row(uri: str, status: str = "ok", n: int = 1) -> dict:
    return {"image_uri": uri, "width": SIDE, "height": SIDE, "status": status,
            "error_kind": None if status == "ok" else "corrupt",
            "error": None if status == "ok" else "not an image", "num_annotations": n}


def _write_outputs(prefix: str, images: list[dict], annotations: list[dict]) -> None:
    fs, root = fsspec.core.url_to_fs(prefix)
    for name, rows, schema in (("images", images, IMAGES_SCHEMA), ("annotations", annotations, ANNOTATIONS_SCHEMA)):
        fs.makedirs(f"{root}/{name}", exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), f"{root}/{name}/part-00000.parquet", filesystem=fs)


CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "Triangle"}]


def _box_case() -> tuple[dict, list[dict], list[dict]]:
    """Ground truth: a.jpg {circle 4x4, square 5x5}, b.jpg {triangle 5x5}, c.jpg {square} (its label run
    failed), d.jpg (not in the run). Predictions, by hand:
      circle: half of it (8 of 16 px) -> IoU 0.5, label "Circle" (right: case does not matter)
      square in a.jpg: exact -> IoU 1.0, label "circle" (wrong)
      triangle: its 25 px plus 25 more -> IoU 0.5, label "triangle" (right)
      square in c.jpg: no prediction -> IoU 0, wrong
    """
    circle, square, triangle = _mask(slice(0, 4), slice(0, 4)), _mask(slice(5, 10), slice(5, 10)), _mask(slice(0, 5), slice(0, 5))
    gt = {
        "images": [{"id": i + 1, "file_name": f"sub/{n}.jpg", "width": SIDE, "height": SIDE} for i, n in enumerate("abcd")],
        "annotations": [_gt_ann(1, 1, 1, circle), _gt_ann(2, 1, 2, square), _gt_ann(3, 2, 3, triangle),
                        _gt_ann(4, 3, 2, square), _gt_ann(5, 4, 1, circle)],
        "categories": CATEGORIES,
    }
    images = [_image_row("/data/sub/a.jpg", n=2), _image_row("/data/sub/b.jpg"), _image_row("/data/sub/c.jpg", "error", 0)]
    annotations = [  # square first: pairing goes by prompt box, not by order; the circle's box is off by half a pixel
        _pred("/data/sub/a.jpg", 0, square, "circle", [5, 5, 10, 10]),
        _pred("/data/sub/a.jpg", 1, _mask(slice(0, 4), slice(0, 2)), "Circle", [0.5, 0, 4, 4.5]),
        _pred("/data/sub/b.jpg", 0, _mask(slice(0, 5), slice(0, 10)), "triangle", [0, 0, 5, 5]),
    ]
    return gt, images, annotations


def test_box_prompted_metrics_match_hand_computed_values(tmp_path):
    gt, images, annotations = _box_case()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    _write_outputs(str(tmp_path / "out"), images, annotations)
    config = evaluation.EvalConfig(
        outputs=str(tmp_path / "out"), ground_truth=str(tmp_path / "gt.json"),
        split=evaluation.Split.from_names(["circle", "square"], ["triangle"]),
    )
    report = evaluation.evaluate(config)

    assert report["mode"] == "box"
    assert (report["images"], report["images_failed"], report["images_not_in_run"]) == (3, 1, 1)
    assert report["overall"] == {"n": 4, "mean_iou": pytest.approx((0.5 + 1.0 + 0.5 + 0.0) / 4), "accuracy": 0.5}
    per_class = {c["name"]: c for c in report["per_class"]}
    assert per_class["circle"] == {"name": "circle", "n": 1, "mean_iou": pytest.approx(0.5), "accuracy": 1.0}
    assert per_class["square"] == {"name": "square", "n": 2, "mean_iou": pytest.approx(0.5), "accuracy": 0.0}
    assert per_class["Triangle"] == {"name": "Triangle", "n": 1, "mean_iou": pytest.approx(0.5), "accuracy": 1.0}
    assert report["base"] == {"n": 3, "mean_iou": pytest.approx(0.5), "accuracy": pytest.approx(1 / 3)}
    assert report["novel"] == {"n": 1, "mean_iou": pytest.approx(0.5), "accuracy": 1.0}
    assert (report["missing"], report["unmatched_predictions"]) == (1, 0)


def test_eval_reads_only_committed_parts_of_the_current_schema_version(tmp_path):
    gt, images, annotations = _box_case()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "out"
    _write_outputs(str(out), images, annotations)
    expected = evaluation.evaluate(evaluation.EvalConfig(str(out), str(tmp_path / "gt.json")))
    # A kill in the middle of publishing a part: its annotations are in the table folder, its images file is
    # not (yet). Counting them would pair each object with a second prediction.
    pq.write_table(pa.Table.from_pylist(annotations, schema=ANNOTATIONS_SCHEMA), out / "annotations/part-1.parquet")
    assert evaluation.evaluate(evaluation.EvalConfig(str(out), str(tmp_path / "gt.json"))) == expected

    old = pa.Table.from_pylist(images, schema=IMAGES_SCHEMA).replace_schema_metadata({})
    pq.write_table(old, out / "images/part-2.parquet")
    with pytest.raises(evaluation.EvalError, match="schema version none"):
        evaluation.evaluate(evaluation.EvalConfig(str(out), str(tmp_path / "gt.json")))


def test_point_prompts_pair_with_the_object_under_the_point(tmp_path):
    gt, images, _ = _box_case()
    square = _mask(slice(5, 10), slice(5, 10))
    annotations = [  # point (x=6, y=7) lies in the square; (x=1, y=1) in the circle, whose prediction is empty
        _pred("/data/sub/a.jpg", 0, square, "square", [6, 7], "point"),
        _pred("/data/sub/a.jpg", 1, np.zeros((SIDE, SIDE), np.uint8), "circle", [1, 1], "point"),
    ]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    _write_outputs(str(tmp_path / "out"), images[:1], annotations)
    report = evaluation.evaluate(evaluation.EvalConfig(str(tmp_path / "out"), str(tmp_path / "gt.json")))
    assert report["mode"] == "point"
    assert report["overall"] == {"n": 2, "mean_iou": pytest.approx(0.5), "accuracy": 1.0}


def test_auto_mode_coco_ap(tmp_path, capfd):
    """circle: one exact prediction -> AP 1. square: a false positive scored above the exact prediction ->
    precision 0.5 at every recall -> AP 0.5. Mean over the two classes: 0.75. A label outside the ground
    truth's categories is left out and counted."""
    circle, square = _mask(slice(0, 4), slice(0, 4)), _mask(slice(5, 10), slice(5, 10))
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "width": SIDE, "height": SIDE}],
          "annotations": [_gt_ann(1, 1, 1, circle), _gt_ann(2, 1, 2, square)], "categories": CATEGORIES[:2]}
    annotations = [
        _pred("s3://b/a.jpg", 0, circle, "circle", [1, 1], "grid", 0.7),
        _pred("s3://b/a.jpg", 1, square, "square", [6, 6], "grid", 0.6),
        _pred("s3://b/a.jpg", 2, circle, "square", [2, 2], "grid", 0.8),
        _pred("s3://b/a.jpg", 3, circle, "hexagon", [2, 2], "grid", 0.8),
    ]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    _write_outputs(str(tmp_path / "out"), [_image_row("s3://b/a.jpg", n=4)], annotations)
    report = evaluation.evaluate(evaluation.EvalConfig(str(tmp_path / "out"), str(tmp_path / "gt.json")))
    assert report["mode"] == "auto"
    assert report["coco_ap"]["AP"] == pytest.approx(0.75)
    assert report["coco_ap"]["AP50"] == pytest.approx(0.75)
    assert (report["predictions"], report["labels_not_in_ground_truth"]) == (3, 1)
    printed = capfd.readouterr().out
    assert "index created" not in printed and "Average Precision" not in printed  # no pycocotools chatter


def test_an_automatic_run_that_found_nothing_scores_zero_instead_of_failing(tmp_path):
    """With no annotation at all the prompt types cannot tell the mode; run.json's mode can."""
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "width": SIDE, "height": SIDE}],
          "annotations": [_gt_ann(1, 1, 1, _mask(slice(0, 4), slice(0, 4)))], "categories": CATEGORIES[:1]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    _write_outputs(str(tmp_path / "out"), [_image_row("s3://b/a.jpg", n=0)], [])
    config = evaluation.EvalConfig(str(tmp_path / "out"), str(tmp_path / "gt.json"))
    with pytest.raises(evaluation.EvalError, match="no annotations to evaluate"):
        evaluation.evaluate(config)
    (tmp_path / "out" / "run.json").write_text(json.dumps({"config": {"mode": "auto"}}))
    report = evaluation.evaluate(config)
    assert (report["mode"], report["coco_ap"]["AP"], report["recall"], report["predictions"]) == ("auto", 0.0, 0.0, 0)


def test_cli_reads_s3_and_writes_eval_json(tmp_path, s3_server):
    bucket = s3_server.make_bucket("eval-outputs")
    gt, images, annotations = _box_case()
    with fsspec.open(f"{bucket}/gt.json", "w") as handle:
        json.dump(gt, handle)
    (tmp_path / "split.json").write_text(json.dumps({"base": ["circle", "square"], "novel": ["triangle"]}))
    _write_outputs(f"{bucket}/run", images, annotations)

    result = CliRunner().invoke(cli, ["eval", f"{bucket}/run", "--gt", f"{bucket}/gt.json",
                                      "--split", str(tmp_path / "split.json")])
    assert result.exit_code == 0, result.output
    assert "[novel]" in result.output and "[overall]" in result.output
    with fsspec.open(f"{bucket}/run/eval.json", "r") as handle:
        written = json.load(handle)
    assert written["overall"]["n"] == 4 and written["novel"]["accuracy"] == 1.0


def test_clear_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["eval", str(tmp_path), "--gt", str(tmp_path / "missing.json")])
    assert result.exit_code != 0 and "does not exist" in result.output and "Traceback" not in result.output
    (tmp_path / "gt.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    result = runner.invoke(cli, ["eval", str(tmp_path), "--gt", str(tmp_path / "gt.json")])
    assert result.exit_code != 0 and "no 'images' table" in result.output


def test_builtin_split_and_name_normalisation():
    split = evaluation.load_split("coco")
    assert (len(split.base), len(split.novel)) == (48, 17)
    assert "person" in split.base and "bus" in split.novel
    assert evaluation.normalise_name("Traffic_Light") == evaluation.normalise_name("traffic light,signal")
