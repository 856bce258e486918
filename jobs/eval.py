"""Evaluation of label outputs against COCO-format ground truth: the paper's metrics.

* Prompted outputs (``prompt_type`` ``box`` or ``point``): every ground-truth object is paired with the
  prediction its prompt produced, then the report gives the mean mask IoU and the recognition accuracy
  (predicted label == ground-truth category, names compared after `normalise_name`), overall, per class
  and, when a split is given, over base and novel classes. A ground-truth object that no prediction
  answers (its image failed, or it was never prompted) counts as IoU 0 and wrong, and is counted in
  ``missing``: an error row never improves a score.
* Automatic outputs (``prompt_type`` ``grid``): COCO mask AP by ``pycocotools.cocoeval.COCOeval``; the
  predicted label is mapped to the ground-truth category of the same name, the score is the row's score.
  Beside AP, class-agnostic figures of what a person would have to fix: ``recall`` (ground-truth objects
  with a predicted mask of IoU >= 0.5), ``unmatched_per_image`` (masks with IoU < 0.5 to every object:
  masks to delete), and ``empty_masks`` (masks of zero pixels).

Only ground-truth images that appear in the output's ``images`` table are evaluated (a run over part of a
data set is evaluated on that part); the report says how many ground-truth images were not in the run.
Output image URIs are matched to ground-truth ``file_name`` by the longest common path suffix.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
from collections.abc import Iterable

import fsspec
import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ovsam.vocabulary import Vocabulary, split_synonyms
from schemas.committed import CommittedTables
from schemas.tables import ANNOTATIONS_DIR, EVAL_FILE, IMAGES_DIR, RUN_FILE, STATUS_OK, SchemaError

PROMPTED_TYPES = ("box", "point")
AUTO_TYPE = "grid"
# A box prompt answers the ground-truth object whose box it overlaps most, if that box IoU is at least
# this; prompts taken from the ground truth itself overlap their object with IoU 1.
MIN_PROMPT_BOX_IOU = 0.5
# Names of COCOeval.stats, in its order (segm).
COCO_AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BUILTIN_SPLITS = ("coco", "lvis")  # vocabularies that carry a base/novel split


class EvalError(ValueError):
    """The outputs or the ground truth cannot be evaluated; the message says why in plain words."""


@dataclasses.dataclass(frozen=True)
class Split:
    """Base and novel class names (normalised with `normalise_name`)."""

    base: frozenset[str]
    novel: frozenset[str]

    @classmethod
    def from_names(cls, base: Iterable[str], novel: Iterable[str]) -> "Split":
        return cls(frozenset(map(normalise_name, base)), frozenset(map(normalise_name, novel)))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """``outputs``: the ``--output`` prefix of a ``label`` run (local path or URL); ``ground_truth``: a COCO
    instances JSON (local path or URL); ``split``: base/novel names or None."""

    outputs: str
    ground_truth: str
    split: Split | None = None


def normalise_name(name: str) -> str:
    """The form in which class names are compared: the first synonym as the vocabulary displays it
    (`ovsam.vocabulary.split_synonyms`: lower case, ``_`` read as a space, ``,``/``/``/``_or_`` separate
    synonyms). ``"Traffic_Light"`` and ``"traffic light,signal"`` match."""
    synonyms = split_synonyms(name)
    return synonyms[0] if synonyms else name.strip().lower()


def load_split(spec: str) -> Split:
    """A split: ``coco`` or ``lvis`` (the built-in vocabularies' base/novel classes) or a JSON file
    ``{"base": [names], "novel": [names]}`` (local path or URL)."""
    if spec.lower() in BUILTIN_SPLITS:
        vocabulary = Vocabulary.from_spec(spec.lower())
        return Split.from_names((vocabulary.names[i] for i in vocabulary.base_ids),
                                (vocabulary.names[i] for i in vocabulary.novel_ids))
    try:
        with fsspec.open(spec, "r") as handle:
            data = json.load(handle)
    except FileNotFoundError as err:
        raise EvalError(f"split file {spec} does not exist") from err
    except json.JSONDecodeError as err:
        raise EvalError(f"split file {spec} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or not {"base", "novel"} <= data.keys():
        raise EvalError(f'split file {spec} must be a JSON object {{"base": [names], "novel": [names]}}')
    return Split.from_names(data["base"], data["novel"])


def _read_tables(prefix: str) -> tuple[list[dict], list[dict]]:
    """The committed images and annotations rows of a label output (`schemas.committed`: an unfinished part
    left by a kill is never read, and a part of another schema version is refused)."""
    fs, root = fsspec.core.url_to_fs(prefix)
    if not fs.isdir(f"{root.rstrip('/')}/{IMAGES_DIR}"):
        raise EvalError(f"no {IMAGES_DIR!r} table under {prefix}: is this the --output of a `label` run?")
    tables = CommittedTables(fs, root, prefix)
    try:
        return tables.read(IMAGES_DIR).to_pylist(), tables.read(ANNOTATIONS_DIR).to_pylist()
    except SchemaError as err:
        raise EvalError(str(err)) from None


def _run_mode(prefix: str) -> str | None:
    """The ``mode`` recorded in the output's ``run.json`` (None when it has none)."""
    fs, root = fsspec.core.url_to_fs(prefix)
    try:
        return json.loads(fs.cat_file(f"{root.rstrip('/')}/{RUN_FILE}"))["config"]["mode"]
    except (FileNotFoundError, KeyError, TypeError, json.JSONDecodeError):
        return None


def load_ground_truth(path: str) -> COCO:
    try:
        with fsspec.open(path, "r") as handle:
            dataset = json.load(handle)
    except FileNotFoundError as err:
        raise EvalError(f"ground-truth file {path} does not exist") from err
    except json.JSONDecodeError as err:
        raise EvalError(f"ground-truth file {path} is not valid JSON: {err}") from err
    if not isinstance(dataset, dict) or not {"images", "annotations", "categories"} <= dataset.keys():
        raise EvalError(f"ground-truth file {path} is not COCO instances JSON (needs images, annotations, categories)")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # "creating index... index created!"
        coco.createIndex()
    return coco


def _match_images(uris: Iterable[str], coco: COCO) -> dict[str, int]:
    """Map each output image URI to the ground-truth image id whose ``file_name`` is its longest path
    suffix; URIs without a ground-truth image are left out."""
    by_name = {img["file_name"].replace("\\", "/").lstrip("./"): img_id for img_id, img in coco.imgs.items()}
    matched = {}
    for uri in uris:
        parts = uri.split("://", 1)[-1].split("/")
        for start in range(len(parts)):
            image_id = by_name.get("/".join(parts[start:]))
            if image_id is not None:
                matched[uri] = image_id
                break
    return matched


def _to_rle(segmentation: dict) -> dict:
    return {"size": list(segmentation["size"]), "counts": segmentation["counts"].encode("ascii")}


def _box_iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _pair_prompts(rows: list[dict], gt_anns: list[dict], gt_rles: list[dict]) -> dict[int, dict]:
    """Pair predictions of one image with its ground-truth objects: {index into gt_anns: row}.

    A box prompt goes to the unpaired object whose box it overlaps most (greedy by box IoU, at least
    `MIN_PROMPT_BOX_IOU`); a point prompt to the smallest unpaired object whose mask contains the point.
    """
    pairs: dict[int, dict] = {}
    boxes = [r for r in rows if r["prompt_type"] == "box"]
    if boxes and gt_anns:
        gt_xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in gt_anns)], np.float64)
        ious = _box_iou_xyxy(np.array([r["prompt"][:4] for r in boxes], np.float64), gt_xyxy)
        used_prompts = set()
        for flat in np.argsort(-ious, axis=None, kind="stable"):
            p, g = (int(i) for i in np.unravel_index(flat, ious.shape))
            if ious[p, g] < MIN_PROMPT_BOX_IOU:
                break
            if g in pairs or p in used_prompts:
                continue
            pairs[g] = boxes[p]
            used_prompts.add(p)
    for row in (r for r in rows if r["prompt_type"] == "point"):
        x, y = int(row["prompt"][0]), int(row["prompt"][1])
        inside = [
            g for g, rle in enumerate(gt_rles)
            if g not in pairs and 0 <= y < rle["size"][0] and 0 <= x < rle["size"][1]
            and mask_utils.decode(rle)[y, x]
        ]
        if inside:
            pairs[min(inside, key=lambda g: gt_anns[g]["area"])] = row
    return pairs


def _summary(ious: list[float], correct: list[bool]) -> dict:
    n = len(ious)
    return {
        "n": n,
        "mean_iou": float(np.mean(ious)) if n else None,
        "accuracy": float(np.mean(correct)) if n else None,
    }


def _evaluate_prompted(rows_by_image: dict[int, list[dict]], image_ids: list[int], coco: COCO, split: Split | None) -> dict:
    category_names = {cat_id: cat["name"] for cat_id, cat in coco.cats.items()}
    per_object = []  # (category name, iou, correct)
    missing = unmatched = 0
    for image_id in image_ids:
        gt_anns = [a for a in coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        gt_rles = [coco.annToRLE(a) for a in gt_anns]
        rows = rows_by_image.get(image_id, [])
        pairs = _pair_prompts(rows, gt_anns, gt_rles)
        unmatched += len(rows) - len(pairs)
        for g, ann in enumerate(gt_anns):
            name = category_names[ann["category_id"]]
            row = pairs.get(g)
            if row is None:
                missing += 1
                per_object.append((name, 0.0, False))
                continue
            iou = float(mask_utils.iou([_to_rle(row["segmentation"])], [gt_rles[g]], [0])[0, 0])
            per_object.append((name, iou, normalise_name(row["label"]) == normalise_name(name)))
    by_class = collections.defaultdict(list)
    for name, iou, correct in per_object:
        by_class[name].append((iou, correct))
    report = {
        "overall": _summary([o[1] for o in per_object], [o[2] for o in per_object]),
        "per_class": [
            {"name": name, **_summary([v[0] for v in values], [v[1] for v in values])}
            for name, values in sorted(by_class.items())
        ],
        "missing": missing,
        "unmatched_predictions": unmatched,
    }
    if split is not None:
        for part, names in (("base", split.base), ("novel", split.novel)):
            chosen = [o for o in per_object if normalise_name(o[0]) in names]
            report[part] = _summary([o[1] for o in chosen], [o[2] for o in chosen])
    return report


def _evaluate_auto(rows_by_image: dict[int, list[dict]], image_ids: list[int], coco: COCO) -> dict:
    category_by_name = {normalise_name(cat["name"]): cat_id for cat_id, cat in coco.cats.items()}
    results, unknown_labels = [], 0
    for image_id in image_ids:
        for row in rows_by_image.get(image_id, []):
            category_id = category_by_name.get(normalise_name(row["label"]))
            if category_id is None:
                unknown_labels += 1
                continue
            results.append({
                "image_id": image_id,
                "category_id": category_id,
                "segmentation": _to_rle(row["segmentation"]),
                "score": float(row["score"]),
            })
    report = {"predictions": len(results), "labels_not_in_ground_truth": unknown_labels,
              **mask_figures([[_to_rle(row["segmentation"]) for row in rows_by_image.get(image_id, [])]
                              for image_id in image_ids],
                             [[coco.annToRLE(ann) for ann in coco.imgToAnns[image_id]]
                              for image_id in image_ids])}
    if not results:
        report["coco_ap"] = {key: 0.0 for key in COCO_AP_KEYS}
        return report
    # pycocotools prints progress and its own summary table; the command prints one table of its own.
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(results), iouType="segm")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    report["coco_ap"] = {key: float(value) for key, value in zip(COCO_AP_KEYS, evaluator.stats)}
    return report


MATCH_IOU = 0.5  # COCO's loosest AP threshold: a mask of IoU >= 0.5 with an object "found" it


def mask_figures(predicted: list[list[dict]], truth: list[list[dict]]) -> dict:
    """Class-agnostic figures over images: predicted[i] / truth[i] are image i's COCO RLEs.

    Returns ``recall`` (share of ground-truth objects matched by some mask at IoU >= 0.5, or None without
    objects), ``unmatched_per_image`` (masks matching no object, per image) and ``empty_masks``.
    """
    found = objects = unmatched = empty = 0
    for dts, gts in zip(predicted, truth):
        objects += len(gts)
        empty += sum(1 for rle in dts if mask_utils.area(rle) == 0)
        if not dts:
            continue
        if not gts:
            unmatched += len(dts)
            continue
        iou = np.asarray(mask_utils.iou(dts, gts, [0] * len(gts))).reshape(len(dts), len(gts))
        found += int((iou.max(axis=0) >= MATCH_IOU).sum())
        unmatched += int((iou.max(axis=1) < MATCH_IOU).sum())
    return {"recall": found / objects if objects else None,
            "unmatched_per_image": unmatched / len(predicted) if predicted else 0.0,
            "empty_masks": empty}


def evaluate(config: EvalConfig) -> dict:
    """Evaluate a label output; return the report (the content of ``eval.json``).

    Keys: ``mode`` (``"box"``, ``"point"`` or ``"auto"``), ``images`` (evaluated), ``images_failed``,
    ``images_not_in_run``; prompted: ``overall`` {n, mean_iou, accuracy}, ``per_class`` [{name, n,
    mean_iou, accuracy}], ``missing``, ``unmatched_predictions``, and ``base``/``novel`` with a split;
    auto: ``coco_ap`` {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl}, ``predictions``,
    ``recall``, ``unmatched_per_image``, ``empty_masks`` (see `mask_figures`).
    """
    coco = load_ground_truth(config.ground_truth)
    images, annotations = _read_tables(config.outputs)
    image_of_uri = _match_images((img["image_uri"] for img in images), coco)
    if not image_of_uri:
        raise EvalError(
            f"none of the {len(images)} images in {config.outputs} matches a file_name in {config.ground_truth}"
        )
    image_ids = sorted(set(image_of_uri.values()))
    rows_by_image = collections.defaultdict(list)
    for row in annotations:
        if row["image_uri"] in image_of_uri:
            rows_by_image[image_of_uri[row["image_uri"]]].append(row)
    prompt_types = {row["prompt_type"] for row in annotations}
    if not prompt_types and _run_mode(config.outputs) == "auto":
        prompt_types = {AUTO_TYPE}  # an automatic run that found nothing: AP 0 and recall 0, not an error
    if prompt_types and prompt_types <= set(PROMPTED_TYPES):
        mode = "box" if prompt_types == {"box"} else "point" if prompt_types == {"point"} else "box+point"
        report = _evaluate_prompted(rows_by_image, image_ids, coco, config.split)
    elif prompt_types == {AUTO_TYPE}:
        mode = "auto"
        report = _evaluate_auto(rows_by_image, image_ids, coco)
    elif not prompt_types:
        raise EvalError(f"{config.outputs} has no annotations to evaluate")
    else:
        raise EvalError(f"{config.outputs} mixes automatic and prompted outputs ({sorted(prompt_types)}); evaluate one run at a time")
    failed = sum(1 for img in images if img["image_uri"] in image_of_uri and img["status"] != STATUS_OK)
    return {
        "mode": mode,
        "images": len(image_ids),
        "images_failed": failed,
        "images_not_in_run": len(coco.imgs) - len(image_ids),
        **report,
    }


def write_report(report: dict, outputs: str) -> str:
    """Write ``report`` as ``eval.json`` under the output prefix; return its path."""
    path = f"{outputs.rstrip('/')}/{EVAL_FILE}"
    with fsspec.open(path, "w") as handle:
        json.dump(report, handle, indent=1)
    return path


def format_report(report: dict) -> str:
    """The report as a plain-text table for a terminal."""

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [f"mode: {report['mode']}   images: {report['images']} (failed {report['images_failed']}, "
             f"ground-truth images not in the run {report['images_not_in_run']})"]
    if "coco_ap" in report:
        lines.append("  ".join(f"{key} {value:.3f}" for key, value in report["coco_ap"].items()))
        lines.append(f"recall@0.5 {fmt(report['recall'])}  masks matching no object per image "
                     f"{report['unmatched_per_image']:.2f}  empty masks {report['empty_masks']}  "
                     f"masks {report['predictions']}")
        return "\n".join(lines)
    lines.append(f"{'class':<24}{'n':>7}{'mean IoU':>10}{'accuracy':>10}")
    rows = [(c["name"], c) for c in report["per_class"]]
    rows += [(f"[{part}]", report[part]) for part in ("base", "novel") if part in report]
    rows.append(("[overall]", report["overall"]))
    for name, values in rows:
        lines.append(f"{name:<24}{values['n']:>7}{fmt(values['mean_iou']):>10}{fmt(values['accuracy']):>10}")
    lines.append(f"ground-truth objects without a prediction: {report['missing']}; "
                 f"predictions without a ground-truth object: {report['unmatched_predictions']}")
    return "\n".join(lines)
