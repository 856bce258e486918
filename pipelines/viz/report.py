"""``ovsam-batch report``: one self-contained HTML page about a label output.

The page needs no network: CSS is inline, charts are inline SVG, pictures are base64 PNG data URIs.
Sections (stable ``id``\\s, for links and tests): ``summary``, ``labels``, ``scores``, ``areas``,
``gallery``, ``errors``, ``eval``.

Statistics come from two streaming scans that read only the columns they need: the images table
(``image_uri``, ``status``, ``error_kind``, ``error``, ``num_annotations``) and the annotations table
(``label``, ``score``, ``area``, ``annotation_id``). Memory is bounded by the number of distinct labels
and the sizes of the samples, not by the number of rows. The gallery then reads only the sampled rows.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import pathlib
import posixpath
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np
import pyarrow.compute as pc
from PIL import Image

from ovsam.redaction import redact_uri
from pipelines.viz.overlay import MISSING_IMAGE_GREY, DrawnObject, contrasting_colour, decode_rle, render_overlay
from pipelines.viz.page import (
    CSS,
    GALLERY_THUMB_PX,
    esc,
    fmt_float,
    fmt_int,
    hbar_chart,
    histogram_svg,
    png_data_uri,
    table,
)
from pipelines.viz.reading import EVAL_FILE, LabelOutput, VizError, read_source_image
from schemas.tables import ANNOTATIONS_DIR, IMAGES_DIR, RUN_FILE, STATUS_OK

SECTIONS = ("summary", "labels", "scores", "areas", "gallery", "errors", "eval")
SCORE_BINS = np.linspace(0.0, 1.0, 21)  # 20 bins of 0.05
# Mask areas span 1 px to tens of megapixels: log10 bins of a quarter decade, trimmed to the data for display.
AREA_LOG10_BINS = np.arange(0.0, 9.0 + 1e-9, 0.25)
MAX_LIST_SHOWN = 8  # items of a long list in run.json shown before "…"
MAX_ERROR_ROWS = 200  # error rows listed individually; counts by reason cover all of them
GALLERY_CROP_MARGIN = 0.15  # fraction of the box side added around a gallery crop, for context
GALLERY_MIN_MARGIN_PX = 8
GALLERY_BACKGROUND = (241, 243, 246)  # around crops that are not square
_MIX_MULTIPLIERS = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """``top_labels``: bars in the label histogram before "other (long tail)"; the gallery shows
    ``per_label`` sampled objects for each of the ``gallery_labels`` most frequent labels."""

    output: str
    out_file: str
    top_labels: int = 25
    gallery_labels: int = 12
    per_label: int = 6
    seed: int = 0
    endpoint_url: str | None = None  # S3-compatible endpoint for s3:// outputs and images

    def __post_init__(self) -> None:
        for name in ("top_labels", "gallery_labels", "per_label"):
            if getattr(self, name) < 1:
                raise VizError(f"{name} must be at least 1, got {getattr(self, name)}")


def _mix64(values: np.ndarray, seed: int) -> np.ndarray:
    """SplitMix64 finaliser of int64 ``values`` xor ``seed``: a stable, well-spread uint64 hash, vectorised."""
    x = values.astype(np.uint64) ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _MIX_MULTIPLIERS[0]
        x = (x ^ (x >> np.uint64(27))) * _MIX_MULTIPLIERS[1]
    return x ^ (x >> np.uint64(31))


@dataclasses.dataclass
class ImageStats:
    total: int = 0
    ok: int = 0
    ok_without_annotations: int = 0
    errors_by_kind: Counter = dataclasses.field(default_factory=Counter)
    example_error_by_kind: dict[str, str] = dataclasses.field(default_factory=dict)
    error_rows: list[dict] = dataclasses.field(default_factory=list)  # first MAX_ERROR_ROWS

    @property
    def errors(self) -> int:
        return self.total - self.ok


@dataclasses.dataclass
class AnnotationStats:
    count: int = 0
    empty_masks: int = 0  # area 0: left out of the area histogram
    score_sum: float = 0.0
    label_counts: Counter = dataclasses.field(default_factory=Counter)
    score_hist: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(len(SCORE_BINS) - 1, np.int64))
    area_hist: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(len(AREA_LOG10_BINS) - 1, np.int64))
    # label -> [(hash, annotation_id)], the per_label smallest hashes: the gallery sample
    sample: dict[str, list[tuple[int, int]]] = dataclasses.field(default_factory=lambda: defaultdict(list))


def scan_images(output: LabelOutput) -> ImageStats:
    stats = ImageStats()
    columns = ["image_uri", "status", "error_kind", "error", "num_annotations"]
    for batch in output.scan(IMAGES_DIR, columns):
        status = batch.column("status")
        ok = pc.equal(status, STATUS_OK)
        stats.total += batch.num_rows
        stats.ok += pc.sum(ok).as_py() or 0
        stats.ok_without_annotations += pc.sum(pc.and_(ok, pc.equal(batch.column("num_annotations"), 0))).as_py() or 0
        failed = batch.filter(pc.invert(ok))
        if not failed.num_rows:
            continue
        kinds = pc.fill_null(failed.column("error_kind"), "unknown")
        for entry in pc.value_counts(kinds).to_pylist():
            stats.errors_by_kind[entry["values"]] += entry["counts"]
        for row in failed.slice(0, MAX_ERROR_ROWS - len(stats.error_rows)).to_pylist():
            stats.error_rows.append(row)
        for kind, message in zip(kinds.to_pylist(), failed.column("error").to_pylist(), strict=True):
            stats.example_error_by_kind.setdefault(kind, message or "")
    return stats


def scan_annotations(output: LabelOutput, per_label: int, seed: int) -> AnnotationStats:
    stats = AnnotationStats()
    for batch in output.scan(ANNOTATIONS_DIR, ["label", "score", "area", "annotation_id"]):
        scores = batch.column("score").to_numpy(zero_copy_only=False)
        areas = batch.column("area").to_numpy(zero_copy_only=False)
        stats.count += batch.num_rows
        stats.score_sum += float(scores.sum(dtype=np.float64))
        stats.score_hist += np.histogram(np.clip(scores, 0.0, 1.0), SCORE_BINS)[0]
        stats.empty_masks += int((areas == 0).sum())
        log_areas = np.log10(areas[areas > 0]).clip(AREA_LOG10_BINS[0], AREA_LOG10_BINS[-1])
        stats.area_hist += np.histogram(log_areas, AREA_LOG10_BINS)[0]
        encoded = pc.dictionary_encode(batch.column("label"))
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        names = encoded.dictionary.to_pylist()
        for code, count in zip(*np.unique(codes, return_counts=True), strict=True):
            stats.label_counts[names[code]] += int(count)
        # Gallery sample: per label, the per_label annotation ids with the smallest hash. Sort the
        # batch by (label, hash), keep each label's first per_label rows, merge them into the running sample.
        hashes = _mix64(batch.column("annotation_id").to_numpy(zero_copy_only=False), seed)
        order = np.lexsort((hashes, codes))
        sorted_codes = codes[order]
        group_start = np.r_[0, np.flatnonzero(np.diff(sorted_codes)) + 1]
        rank = np.arange(len(order)) - np.repeat(group_start, np.diff(np.r_[group_start, len(order)]))
        ids = batch.column("annotation_id").to_numpy(zero_copy_only=False)
        for i in order[rank < per_label]:
            stats.sample[names[codes[i]]].append((int(hashes[i]), int(ids[i])))
        for label in {names[c] for c in np.unique(codes)}:
            stats.sample[label] = sorted(stats.sample[label])[:per_label]
    return stats


@dataclasses.dataclass(frozen=True)
class GalleryItem:
    label: str
    data_uri: str
    caption: str  # score and file name
    title: str  # full (redacted) URI, shown on hover
    note: str = ""  # why the picture is not the real image, when it is not


def _crop_box(bbox: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    x, y, w, h = bbox
    margin = max(GALLERY_MIN_MARGIN_PX, GALLERY_CROP_MARGIN * max(w, h))
    x0, y0 = max(0, int(math.floor(x - margin))), max(0, int(math.floor(y - margin)))
    x1, y1 = min(width, int(math.ceil(x + w + margin))), min(height, int(math.ceil(y + h + margin)))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def build_gallery(
    output: LabelOutput, labels: Sequence[str], sample: dict[str, list[tuple[int, int]]]
) -> dict[str, list[GalleryItem]]:
    """Thumbnails of the sampled objects of ``labels``: each a crop around the object with its mask drawn.

    Reads only the sampled rows, and each source image once.
    """
    wanted = [annotation_id for label in labels for _, annotation_id in sample.get(label, [])]
    if not wanted:
        return {}
    rows = output.annotations_by_id(wanted).to_pylist()
    rank = {annotation_id: i for i, annotation_id in enumerate(wanted)}
    by_image: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_image[row["image_uri"]].append(row)
    items: dict[str, list[tuple[int, GalleryItem]]] = defaultdict(list)
    for uri in sorted(by_image):
        try:
            rgb, unreadable = read_source_image(uri, output.endpoint_url), ""
        except VizError as err:
            rgb, unreadable = None, f"source image unavailable ({err}); mask on grey"
        for row in by_image[uri]:
            mask = decode_rle(row["segmentation"])
            notes = []
            if rgb is not None and rgb.shape[:2] == mask.shape:
                base = rgb
            else:
                notes.append(unreadable or "source image changed since labelling; mask on grey")
                base = np.full((*mask.shape, 3), MISSING_IMAGE_GREY, np.uint8)
            if row["bbox"][2] <= 0 or row["bbox"][3] <= 0:
                notes.append("empty mask")
            items[row["label"]].append((rank[row["annotation_id"]], GalleryItem(
                label=row["label"],
                data_uri=png_data_uri(_gallery_picture(base, mask, row)),
                caption=f"{row['score']:.2f} · {posixpath.basename(uri)}",
                title=redact_uri(uri),
                note="; ".join(notes),
            )))
    return {label: [item for _, item in sorted(entries, key=lambda e: e[0])] for label, entries in items.items()}


def _gallery_picture(rgb: np.ndarray, mask: np.ndarray, row: dict) -> Image.Image:
    """A crop of ``rgb`` around the object of ``row`` with its ``mask`` drawn in a colour that stands out,
    scaled so its longer side is `GALLERY_THUMB_PX` (small objects enlarged, large ones shrunk) and centred
    on a square tile."""
    x0, y0, x1, y1 = _crop_box(row["bbox"], *mask.shape)
    x, y, w, h = row["bbox"]
    crop = rgb[y0:y1, x0:x1]
    obj = DrawnObject(mask=mask[y0:y1, x0:x1], bbox=(x - x0, y - y0, w, h), label=row["label"], score=row["score"])
    picture = render_overlay(crop, [obj], draw_text=False, colours=[contrasting_colour(crop)])
    scale = GALLERY_THUMB_PX / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    tile = Image.new("RGB", (GALLERY_THUMB_PX, GALLERY_THUMB_PX), GALLERY_BACKGROUND)  # square: rows line up
    tile.paste(picture.resize(size, Image.Resampling.LANCZOS),
               ((GALLERY_THUMB_PX - size[0]) // 2, (GALLERY_THUMB_PX - size[1]) // 2))
    return tile


def _area_tick(log10_area: float) -> str:
    value = 10**log10_area
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def _flatten(value: object, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, shown value) of a JSON value; long lists (a vocabulary's names) shortened, empty and
    null values left out."""
    if isinstance(value, dict):
        return [item for key, sub in value.items() for item in _flatten(sub, f"{prefix}{key}.")]
    key = prefix.rstrip(".")
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, list) and len(value) > MAX_LIST_SHOWN:
        return [(key, f"{len(value):,} items: {', '.join(map(str, value[:MAX_LIST_SHOWN]))}, …")]
    if isinstance(value, float):
        return [(key, f"{value:.4g}")]
    return [(key, str(value))]


# The fields of run.json (written by `pipelines.label`) a reader looks for first, and their names on the page.
RUN_HEADLINE = (
    ("status", "status"), ("started_at", "started"), ("finished_at", "finished"),
    ("summary.seconds", "seconds (last run)"), ("summary.images_per_second", "images/s (last run)"),
    ("model.name", "model"), ("model.trained", "trained weights"), ("config.mode", "mode"),
    ("vocabulary.name", "vocabulary"), ("config.input", "input"), ("config.prompts", "prompts"),
    ("config.automatic.points_per_side", "points per side"),
)


def _run_html(run: dict) -> str:
    """The run record: the headline fields, then every field (so that a newer record is never hidden) folded."""
    fields = dict(_flatten(run))
    automatic = fields.get("config.mode") == "auto"
    rows = [(esc(name), esc(fields[key])) for key, name in RUN_HEADLINE
            if key in fields and (automatic or not key.startswith("config.automatic."))]
    vocabulary = (run.get("vocabulary") or {}).get("names")
    if isinstance(vocabulary, list):
        rows.append(("classes", fmt_int(len(vocabulary))))
    every = table(["field", "value"], [(esc(k), esc(v)) for k, v in fields.items()])
    return table(["", ""], rows) + f"<details><summary>All fields of {RUN_FILE}</summary>{every}</details>"


def _not_available(what_html: str) -> str:
    return f'<p class="na">Not available: {what_html}</p>'


def _summary_html(prefix: str, images: ImageStats, annotations: AnnotationStats, run: dict | None) -> str:
    mean_score = annotations.score_sum / annotations.count if annotations.count else None
    cards = [
        ("images", fmt_int(images.total)),
        ("labelled", fmt_int(images.ok)),
        ("errors", fmt_int(images.errors)),
        ("annotations", fmt_int(annotations.count)),
        ("per labelled image", fmt_float(annotations.count / images.ok, 1) if images.ok else "–"),
        ("distinct labels", fmt_int(len(annotations.label_counts))),
        ("mean score", fmt_float(mean_score)),
    ]
    run_summary = (run or {}).get("summary") or {}
    if isinstance(run_summary.get("seconds"), (int, float)):
        cards.append(("seconds (last run)", f"{run_summary['seconds']:,.1f}"))
    if isinstance(run_summary.get("images_per_second"), (int, float)):
        cards.append(("images/s (last run)", f"{run_summary['images_per_second']:.2f}"))
    body = '<div class="cards">' + "".join(
        f'<div class="card"><b>{value}</b><span>{esc(name)}</span></div>' for name, value in cards) + "</div>"
    if images.ok_without_annotations:
        body += f'<p class="muted">{fmt_int(images.ok_without_annotations)} labelled images have no annotations.</p>'
    if images.errors_by_kind:
        rows = [(esc(kind), fmt_int(n)) for kind, n in images.errors_by_kind.most_common()]
        body += "<h3>Errors by reason</h3>" + table(["reason", "images"], rows, [False, True])
    body += "<h3>Run</h3>"
    if run is None:
        return body + _not_available(f"the run wrote no {RUN_FILE} under {esc(prefix)}.")
    return body + _run_html(run)


def _labels_html(stats: AnnotationStats, top: int) -> str:
    if not stats.label_counts:
        return _not_available("no annotations.")
    ranked = stats.label_counts.most_common()
    items, tail = ranked[:top], ranked[top:]
    if not tail:
        return hbar_chart(items)
    items.append((f"other (long tail: {len(tail)} labels)", sum(n for _, n in tail)))
    note = f'<p class="muted">The {fmt_int(len(tail))} labels after the top {top} are summed in the last bar.</p>'
    return hbar_chart(items) + note


def _scores_html(stats: AnnotationStats) -> str:
    if not stats.count:
        return _not_available("no annotations.")
    edges = [f"{edge:.2f}" for edge in SCORE_BINS]
    return histogram_svg(stats.score_hist, edges, "score (fused class probability of the label)")


def _areas_html(stats: AnnotationStats) -> str:
    if not stats.count:
        return _not_available("no annotations.")
    empty = f'<p class="muted">{fmt_int(stats.empty_masks)} empty masks (area 0) are not in the histogram.</p>'
    if stats.empty_masks == stats.count:
        return _not_available(f"all {fmt_int(stats.count)} masks are empty (area 0).")
    nonzero = np.flatnonzero(stats.area_hist)
    first, last = int(nonzero[0]), int(nonzero[-1]) + 1
    edges = [_area_tick(edge) for edge in AREA_LOG10_BINS[first:last + 1]]
    chart = histogram_svg(stats.area_hist[first:last], edges, "mask area in pixels (log scale)")
    return chart + (empty if stats.empty_masks else "")


def _gallery_html(labels: Sequence[str], gallery: dict[str, list[GalleryItem]], counts: Counter,
                  per_label: int) -> str:
    if not labels:
        return _not_available("no annotations.")
    which = "the most frequent label" if len(labels) == 1 else f"each of the {len(labels)} most frequent labels"
    parts = [f'<p class="muted">Up to {per_label} objects of {which}, sampled at random (seeded) among all '
             "objects with that label.</p>"]
    for label in labels:
        figures = "".join(
            f'<figure title="{esc(item.title)}"><img src="{item.data_uri}" alt="{esc(label)}">'
            f"<figcaption>{esc(item.caption)}</figcaption>"
            + (f'<figcaption class="muted">{esc(item.note)}</figcaption>' if item.note else "")
            + "</figure>"
            for item in gallery.get(label, [])
        )
        parts.append(f'<h3>{esc(label)} <span class="muted">({fmt_int(counts[label])})</span></h3>'
                     f'<div class="gallery">{figures}</div>')
    return "".join(parts)


def _errors_html(stats: ImageStats) -> str:
    if not stats.errors:
        return "<p>No errors: every image was labelled.</p>"
    by_kind = [(esc(kind), fmt_int(n), esc(stats.example_error_by_kind.get(kind, "")))
               for kind, n in stats.errors_by_kind.most_common()]
    body = table(["reason", "images", "example message"], by_kind, [False, True, False])
    shown = len(stats.error_rows)
    cut = "" if shown == stats.errors else f" (first {shown} of {fmt_int(stats.errors)})"
    body += f"<h3>Error list{cut}</h3>"
    rows = [(f'<span class="uri">{esc(redact_uri(r["image_uri"]))}</span>', esc(r["error_kind"] or "unknown"),
             esc(r["error"] or "")) for r in stats.error_rows]
    return body + table(["image", "reason", "message"], rows)


# Scalar facts of eval.json (jobs.eval.evaluate) shown above the metrics, in this order.
EVAL_FACTS = ("mode", "images", "images_failed", "images_not_in_run", "missing", "unmatched_predictions",
              "predictions", "labels_not_in_ground_truth")
METRIC_COLUMNS = ["objects", "mean IoU", "accuracy"]


def _metric_cells(summary: dict) -> list[str]:
    return [fmt_int(summary.get("n") or 0), fmt_float(summary.get("mean_iou")), fmt_float(summary.get("accuracy"))]


def _eval_html(report: dict | None, prefix: str) -> str:
    if report is None:
        return _not_available(f"no {EVAL_FILE} under {esc(prefix)}. Run <code>ovsam-batch eval {esc(prefix)} "
                              "--gt GROUND_TRUTH.json</code> to add the metrics.")
    facts = [(esc(key.replace("_", " ")), esc(report[key])) for key in EVAL_FACTS if key in report]
    body = table(["", ""], facts)
    summaries = [(esc(name), *_metric_cells(report[name]))
                 for name in ("overall", "base", "novel") if isinstance(report.get(name), dict)]
    if summaries:
        body += "<h3>Metrics</h3>" + table(["", *METRIC_COLUMNS], summaries, [False, True, True, True])
    if isinstance(report.get("coco_ap"), dict):
        ap = report["coco_ap"]
        body += "<h3>COCO mask AP</h3>" + table(list(ap), [[fmt_float(v) for v in ap.values()]], [True] * len(ap))
    if report.get("per_class"):
        classes = sorted(report["per_class"], key=lambda c: (-(c.get("n") or 0), str(c.get("name"))))
        rows = [(esc(c.get("name")), *_metric_cells(c)) for c in classes]
        body += "<h3>Per class</h3>" + table(["class", *METRIC_COLUMNS], rows, [False, True, True, True])
    return body


SECTION_TITLES = {
    "summary": "Run summary", "labels": "Labels", "scores": "Score distribution",
    "areas": "Mask-area distribution", "gallery": "Gallery per label", "errors": "Errors",
    "eval": "Evaluation against ground truth",
}
UNTRAINED_WARNING = ("These labels come from an untrained model (seeded random weights): they show that the "
                     "pipeline works, not what a trained model would label.")


def build_report(config: ReportConfig) -> str:
    """The report page of ``config.output`` as an HTML string."""
    output = LabelOutput(config.output, config.endpoint_url)
    prefix = output.display
    images = scan_images(output)
    annotations = scan_annotations(output, config.per_label, config.seed)
    run = output.read_json(RUN_FILE)
    evaluation = output.read_json(EVAL_FILE)
    gallery_labels = [label for label, _ in annotations.label_counts.most_common(config.gallery_labels)]
    gallery = build_gallery(output, gallery_labels, annotations.sample)

    untrained = run is not None and (run.get("model") or {}).get("trained") is False
    bodies = {
        "summary": (f'<p class="warn">{UNTRAINED_WARNING}</p>' if untrained else "")
        + _summary_html(prefix, images, annotations, run),
        "labels": _labels_html(annotations, config.top_labels),
        "scores": _scores_html(annotations),
        "areas": _areas_html(annotations),
        "gallery": _gallery_html(gallery_labels, gallery, annotations.label_counts, config.per_label),
        "errors": _errors_html(images),
        "eval": _eval_html(evaluation, prefix),
    }
    sections = "".join(f'<section id="{s}"><h2>{esc(SECTION_TITLES[s])}</h2>{bodies[s]}</section>' for s in SECTIONS)
    nav = "".join(f'<a href="#{s}">{esc(SECTION_TITLES[s])}</a>' for s in SECTIONS)
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>ovsam-batch report: {esc(prefix)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>ovsam-batch labelling report</h1><p>{esc(prefix)} · generated {generated}</p>"
        f"<nav>{nav}</nav></header><main>{sections}</main></body></html>\n"
    )


def default_report_file(output: str) -> str:
    """Where `report` writes by default: beside a local output (``runs/a`` -> ``runs/a-report.html``), so it
    never lands in whatever folder the command happens to run in; for an object-store output, in the
    current folder, named after the output's last path part."""
    trimmed = output.rstrip("/")
    if "://" in trimmed and not trimmed.startswith("file://"):
        return f"{posixpath.basename(trimmed) or 'output'}-report.html"
    return f"{trimmed.removeprefix('file://')}-report.html"


def write_report(config: ReportConfig) -> str:
    """Build the report and write it to ``config.out_file`` (local path); return that path."""
    page = build_report(config)
    path = pathlib.Path(config.out_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return str(path)
