"""`ovsam-batch show` and `ovsam-batch report` on real outputs of a small label run.

The session fixture labels the example images (plus a corrupt and an empty file, so the errors section
has rows) and evaluates the run against the examples' ground truth, then the tests draw and report it
and check the files: PNGs decode, have the image's size, and masks (only) are painted;
the HTML has its sections and decodable embedded pictures; headless Chromium renders it.
"""

from __future__ import annotations

import base64
import io
import json
import pathlib
import re
import shutil
import subprocess

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from jobs.shapes import SHAPE_CLASSES
from ovsam_batch.cli import main as cli
from pipelines.viz.overlay import (
    DISPLAY_MAX_SIDE,
    FILL_ALPHA,
    MISSING_IMAGE_GREY,
    OUTLINE_PX,
    PALETTE,
    DrawnObject,
    decode_rle,
    render_overlay,
)
from pipelines.viz.reading import AnnotationFilter, BottomK, LabelOutput, read_source_image
from pipelines.viz.report import SECTIONS
from pipelines.viz.sheet import CELL_GAP_PX
from pipelines.viz.show import SHEET_CELL_PX

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE_IMAGES = REPO / "examples" / "images"
EXAMPLE_BOXES = REPO / "examples" / "boxes.json"
BROWSER = pathlib.Path("/usr/bin/chromium")
BROWSER_SCRIPT = REPO / "scripts" / "check_report_in_browser.sh"


# ------------------------------------------------------------------ fixtures
# The examples' own classes: box mode names each example box with one of them.
SHAPES_VOCABULARY = "circle,square,triangle,star,hexagon"


@pytest.fixture(scope="session")
def label_output(tmp_path_factory, ray_cluster) -> pathlib.Path:
    """A real `ovsam-batch label` run (box mode, `tiny` preset) over the example images plus a corrupt and
    an empty file (two error rows), evaluated against the examples' ground truth (eval.json)."""
    root = tmp_path_factory.mktemp("viz")
    inputs = root / "inputs"
    shutil.copytree(EXAMPLE_IMAGES, inputs)
    (inputs / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (inputs / "empty.jpg").write_bytes(b"")
    output = root / "output"
    # In-process: the run joins the session's Ray.
    _invoke("label", str(inputs), "--output", str(output), "--mode", "box", "--prompts", str(EXAMPLE_BOXES),
            "--vocabulary", SHAPES_VOCABULARY, "--preset", "tiny")
    _invoke("eval", str(output), "--gt", str(EXAMPLE_BOXES))
    images, _ = _tables(output)
    assert sorted(i["status"] for i in images).count("error") == 2 and (output / "eval.json").exists()
    return output


def _tables(output: pathlib.Path) -> tuple[list[dict], list[dict]]:
    def read(name: str) -> list[dict]:
        return pa.concat_tables(pq.read_table(p) for p in sorted((output / name).glob("part-*.parquet"))).to_pylist()

    return read("images"), read("annotations")


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


# ------------------------------------------------------------------ show
def test_overlays_have_the_image_size_and_paint_the_masks(label_output, tmp_path):
    images, annotations = _tables(label_output)
    ok_images = [i for i in images if i["status"] == "ok"]
    _invoke("show", str(label_output), "--out", str(tmp_path), "--sample", str(len(ok_images)))
    overlays = sorted((tmp_path / "overlays").glob("*.png"))
    assert len(overlays) == len(ok_images)

    checked_masks = 0
    for image in ok_images:
        name = pathlib.Path(image["image_uri"]).stem
        [path] = [p for p in overlays if p.name.startswith(name + "_")]
        overlay = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
        assert overlay.shape == (image["height"], image["width"], 3)
        source = read_source_image(image["image_uri"]).astype(np.int16)
        masks = [decode_rle(a["segmentation"]) for a in annotations if a["image_uri"] == image["image_uri"]]
        union = np.logical_or.reduce(masks) if masks else np.zeros(overlay.shape[:2], bool)
        changed = np.any(overlay != source, axis=-1)
        # Every mask is painted: (nearly) all its pixels differ from the source.
        for mask in masks:
            assert changed[mask].mean() > 0.95
            checked_masks += 1
        # Away from the masks (and their outlines, which straddle the edge) only label boxes change pixels:
        # most of the background is untouched.
        near = cv2.dilate(union.astype(np.uint8), np.ones((2 * OUTLINE_PX + 1,) * 2, np.uint8)).astype(bool)
        if (~near).sum() > 1000:
            assert changed[~near].mean() < 0.5
    assert checked_masks == len(annotations)

    sheet = Image.open(tmp_path / "contact_sheet.png")
    columns = min(4, len(ok_images))
    assert sheet.size[0] == columns * (SHEET_CELL_PX + CELL_GAP_PX) + CELL_GAP_PX
    assert np.asarray(sheet).std() > 10


def test_each_mask_gets_its_own_palette_colour_deterministically():
    # Large solid shapes with known masks (the tiny model's untrained masks are speckled: all outline).
    rgb = np.full((320, 320, 3), 90, np.uint8)
    objects = []
    for class_id, (cx, cy) in enumerate([(80, 90), (230, 100), (150, 240)]):
        mask = np.zeros((320, 320), np.uint8)
        cv2.circle(mask, (cx, cy), 55, 1, -1)
        mask = mask.astype(bool) & ~np.logical_or.reduce([m for _, m in objects] or [np.zeros_like(mask, bool)])
        rgb[mask] = (40 * class_id + 60, 200 - 30 * class_id, 120)
        objects.append((class_id, mask))
    drawn = [DrawnObject(mask=m, bbox=tuple(_bbox(m)), label=SHAPE_CLASSES[c], score=0.5) for c, m in objects]
    overlay = np.asarray(render_overlay(rgb, drawn)).astype(np.int16)
    assert np.array_equal(overlay, np.asarray(render_overlay(rgb, drawn)))
    kernel = np.ones((2 * OUTLINE_PX + 1,) * 2, np.uint8)
    for i, obj in enumerate(drawn):
        # Inside the mask, away from every outline, the overlay is the source blended with the mask's colour
        # (except under label boxes).
        others = np.logical_or.reduce([o.mask for j, o in enumerate(drawn) if j != i])
        inside = cv2.erode(obj.mask.astype(np.uint8), kernel).astype(bool)
        inside &= ~cv2.dilate(others.astype(np.uint8), kernel).astype(bool)
        colour = np.array(PALETTE[i])
        blended = np.round((1 - FILL_ALPHA) * rgb[inside] + FILL_ALPHA * colour)
        assert (np.abs(overlay[inside] - blended) <= 1).all(axis=-1).mean() > 0.5, i
        # The outline is the colour itself.
        edge = obj.mask & ~cv2.erode(obj.mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~others
        assert (overlay[edge] == colour).all(axis=-1).mean() > 0.5, i
    assert len(set(PALETTE[: len(drawn)])) == len(drawn)


def test_large_images_are_drawn_scaled_down_with_their_masks():
    rgb = np.full((1500, 2000, 3), 200, np.uint8)
    mask = np.zeros((1500, 2000), bool)
    mask[500:1000, 1000:1800] = True
    drawn = DrawnObject(mask=mask, bbox=(1000, 500, 800, 500), label="x", score=1.0)
    overlay = np.asarray(render_overlay(rgb, [drawn]))
    scale = DISPLAY_MAX_SIDE / 2000
    assert overlay.shape == (round(1500 * scale), DISPLAY_MAX_SIDE, 3)
    changed = (overlay != 200).any(axis=-1)
    inside = changed[round(600 * scale):round(900 * scale), round(1100 * scale):round(1700 * scale)]
    assert inside.all() and not changed[round(1100 * scale):, :round(900 * scale)].any()


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def test_show_filters_by_label_score_and_image(label_output, tmp_path):
    images, annotations = _tables(label_output)
    label = max({a["label"] for a in annotations}, key=lambda name: sum(a["label"] == name for a in annotations))
    # A score window that only some images' annotations fall into: the 2nd to 5th lowest scores of the label.
    scores = sorted(a["score"] for a in annotations if a["label"] == label)
    low, high = (scores[0] + scores[1]) / 2, (scores[4] + scores[5]) / 2
    expected_images = {a["image_uri"] for a in annotations if a["label"] == label and low <= a["score"] <= high}
    assert 0 < len(expected_images) < sum(i["status"] == "ok" for i in images)

    output = _invoke("show", str(label_output), "--out", str(tmp_path / "f"), "--label", label,
                     "--min-score", repr(low), "--max-score", repr(high), "--sample", "100")
    drawn = sorted((tmp_path / "f" / "overlays").glob("*.png"))
    assert len(drawn) == len(expected_images), output
    assert {p.name.rsplit("_", 1)[0] for p in drawn} == {pathlib.Path(u).stem for u in expected_images}

    one = sorted(expected_images)[0]
    _invoke("show", str(label_output), "--out", str(tmp_path / "one"), "--image", pathlib.Path(one).name)
    [path] = (tmp_path / "one" / "overlays").glob("*.png")
    assert path.name.startswith(pathlib.Path(one).stem + "_")

    show = ["show", str(label_output), "--out", str(tmp_path / "x")]
    result = CliRunner().invoke(cli, [*show, "--label", "no-such-label"])
    assert result.exit_code != 0 and "no annotation that passes the filter" in result.output
    result = CliRunner().invoke(cli, [*show, "--image", "missing.jpg"])
    assert result.exit_code != 0 and "no image" in result.output and "missing.jpg" in result.output
    result = CliRunner().invoke(cli, ["show", str(tmp_path), "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "not an output of `ovsam-batch label`" in result.output


def test_show_draws_masks_on_grey_when_the_source_image_is_gone(label_output, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(label_output, moved)
    for table in ("images", "annotations"):
        for part in (moved / table).glob("part-*.parquet"):
            data = pq.read_table(part)
            uris = [u.replace(str(label_output.parent), "/gone") for u in data.column("image_uri").to_pylist()]
            pq.write_table(data.set_column(0, "image_uri", pa.array(uris, pa.string())), part)
    result = CliRunner().invoke(cli, ["show", str(moved), "--out", str(tmp_path / "o"), "--sample", "2"])
    assert result.exit_code == 0, result.output
    assert "cannot read source image" in result.stderr
    _, annotations = _tables(moved)
    drawn = sorted((tmp_path / "o" / "overlays").glob("*.png"))
    assert len(drawn) == 2
    for path in drawn:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        masks = [decode_rle(a["segmentation"]) for a in annotations
                 if pathlib.Path(a["image_uri"]).stem == path.name.rsplit("_", 1)[0]]
        union = np.logical_or.reduce(masks)
        grey = (pixels == MISSING_IMAGE_GREY).all(axis=-1)
        assert not grey[union].any()  # the masks are drawn ...
        near = cv2.dilate(union.astype(np.uint8), np.ones((2 * OUTLINE_PX + 1,) * 2, np.uint8)).astype(bool)
        if (~near).sum() > 1000:
            assert grey[~near].mean() > 0.5  # ... on a grey canvas (plus labels and the reason)


def test_sample_is_deterministic_and_independent_of_parts(label_output, tmp_path):
    images, _ = _tables(label_output)
    # The same rows in parts of 3 images each, written in reverse order.
    split = tmp_path / "split"
    image_table = pa.Table.from_pylist(images, pq.read_schema(next((label_output / "images").glob("*.parquet"))))
    annotation_table = pa.concat_tables(pq.read_table(p) for p in (label_output / "annotations").glob("*.parquet"))
    for table in ("images", "annotations"):
        (split / table).mkdir(parents=True)
    for k, start in reversed(list(enumerate(range(0, len(images), 3)))):
        chunk = image_table.slice(start, 3)
        in_chunk = pc.is_in(annotation_table.column("image_uri"), chunk.column("image_uri"))
        pq.write_table(chunk, split / "images" / f"part-{k}.parquet")
        pq.write_table(annotation_table.filter(in_chunk), split / "annotations" / f"part-{k}.parquet")
    flt = AnnotationFilter()
    first = LabelOutput(str(label_output)).sample_images(3, seed=1, annotation_filter=flt)
    assert first == LabelOutput(str(label_output)).sample_images(3, seed=1, annotation_filter=flt)
    assert first == LabelOutput(str(split)).sample_images(3, seed=1, annotation_filter=flt)
    by_label = AnnotationFilter(min_score=0.5)
    assert (LabelOutput(str(label_output)).sample_images(3, seed=1, annotation_filter=by_label)
            == LabelOutput(str(split)).sample_images(3, seed=1, annotation_filter=by_label))
    assert len(first) == 3 and all(i["status"] == "ok" for i in images if i["image_uri"] in first)
    # Another seed, another sample (8 images, 3 chosen: five seeds agreeing by chance is ~1e-7).
    samples = {tuple(sorted(LabelOutput(str(label_output)).sample_images(3, seed, flt))) for seed in range(5)}
    assert len(samples) > 1


def test_bottom_k_keeps_the_smallest_hashes_in_bounded_memory():
    keys = [f"s3://b/img_{i:05d}.jpg" for i in range(5000)]
    sample = BottomK(7, seed=3)
    sample.offer(keys)
    sample.offer(reversed(keys))  # duplicates and order change nothing
    again = BottomK(7, seed=3)
    again.offer(sorted(keys, key=hash))
    assert sample.keys() == again.keys() and len(sample.keys()) == 7
    assert len(sample._heap) == 7 and len(sample._kept) == 7


# ------------------------------------------------------------------ report
def _embedded_pngs(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data)))
            for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_is_one_offline_file_with_every_section(label_output, tmp_path):
    images, annotations = _tables(label_output)
    path = tmp_path / "report.html"
    _invoke("report", str(label_output), "--out", str(path), "--per-label", "3")
    page = path.read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    # Nothing fetched from anywhere: no external src/href, no scripts.
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page
    # Gallery: per_label pictures per label (fewer when a label has fewer objects), each a decodable PNG.
    counts = {}
    for a in annotations:
        counts[a["label"]] = counts.get(a["label"], 0) + 1
    pictures = _embedded_pngs(page)
    assert len(pictures) == sum(min(3, n) for n in counts.values())
    for picture in pictures:
        picture.load()
        assert max(picture.size) == 144 and np.asarray(picture).std() > 5
    labels = page.split('<section id="labels">')[1].split("</section>")[0]
    for label, count in counts.items():
        assert f"<title>{label}: {count}</title>" in labels
    # Summary counts and the error list come from the tables.
    summary = page.split('<section id="summary">')[1].split("</section>")[0]
    assert f"<b>{len(images)}</b><span>images</span>" in summary
    assert f"<b>{len(annotations)}</b><span>annotations</span>" in summary
    errors = page.split('<section id="errors">')[1].split("</section>")[0]
    for image in images:
        if image["status"] != "ok":
            assert image["image_uri"] in errors and image["error_kind"] in errors
    # eval.json is there: metrics and the per-class table.
    evaluation = json.loads((label_output / "eval.json").read_text())
    eval_section = page.split('<section id="eval">')[1].split("</section>")[0]
    assert "Per class" in eval_section and "Not available" not in eval_section
    assert f"{evaluation['overall']['mean_iou']:.3f}" in eval_section
    for cls in evaluation["per_class"]:
        assert f"<td>{cls['name']}</td>" in eval_section


def test_label_histogram_sums_the_long_tail(label_output, tmp_path):
    # The untrained model names nearly everything alike: give the real rows many labels, most of them rare.
    relabelled = tmp_path / "relabelled"
    shutil.copytree(label_output, relabelled)
    names = []
    for part in sorted((relabelled / "annotations").glob("part-*.parquet")):
        table = pq.read_table(part)
        labels = [f"class_{min(i, 3 + i % 7)}" for i in range(len(names), len(names) + table.num_rows)]
        names += labels
        pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels)), part)
    counts = {name: names.count(name) for name in set(names)}
    top = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:2]
    _invoke("report", str(relabelled), "--out", str(tmp_path / "r.html"), "--top", "2", "--gallery-labels", "2",
            "--per-label", "1")
    page = (tmp_path / "r.html").read_text()
    labels = page.split('<section id="labels">')[1].split("</section>")[0]
    tail = len(counts) - 2
    assert f"other (long tail: {tail} labels): {len(names) - sum(n for _, n in top)}</title>" in labels
    assert labels.count("<rect") == 3
    gallery = page.split('<section id="gallery">')[1].split("</section>")[0]
    assert gallery.count("<img") == 2 and all(f"<h3>{name} " in gallery for name, _ in top)


def test_report_says_what_is_not_available(label_output, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(label_output, bare)
    (bare / "eval.json").unlink()
    (bare / "run.json").unlink(missing_ok=True)
    _invoke("report", str(bare), "--out", str(tmp_path / "r.html"))
    page = (tmp_path / "r.html").read_text()
    eval_section = page.split('<section id="eval">')[1].split("</section>")[0]
    assert "Not available" in eval_section and "ovsam-batch eval" in eval_section
    assert "Not available: the run wrote no run.json" in page


def test_report_shows_coco_ap_of_an_automatic_eval(label_output, tmp_path):
    from jobs.eval import COCO_AP_KEYS

    auto = tmp_path / "auto"
    shutil.copytree(label_output, auto)
    coco_ap = {key: round(0.01 * (i + 1), 3) for i, key in enumerate(COCO_AP_KEYS)}
    (auto / "eval.json").write_text(json.dumps({"mode": "auto", "images": 8, "images_failed": 0,
                                                "images_not_in_run": 0, "predictions": 18, "coco_ap": coco_ap}))
    _invoke("report", str(auto), "--out", str(tmp_path / "r.html"))
    eval_section = (tmp_path / "r.html").read_text().split('<section id="eval">')[1].split("</section>")[0]
    assert "COCO mask AP" in eval_section and "Per class" not in eval_section
    for key, value in coco_ap.items():
        assert f'<th class="num">{key}</th>' in eval_section and f'<td class="num">{value:.3f}</td>' in eval_section


def test_report_and_show_read_an_s3_output_and_s3_images(label_output, s3_server, tmp_path):
    import fsspec

    # The output and its source images both in the bucket: image_uri rewritten to the uploaded copies.
    bucket = s3_server.make_bucket("viz-output")
    fs = fsspec.filesystem("s3")
    inputs = label_output.parent / "inputs"
    fs.put(str(inputs), f"{bucket}/inputs", recursive=True)
    moved = tmp_path / "moved"
    shutil.copytree(label_output, moved)
    for part in [*(moved / "images").glob("*.parquet"), *(moved / "annotations").glob("*.parquet")]:
        data = pq.read_table(part)
        uris = [f"{bucket}/inputs/{pathlib.PurePosixPath(u).name}" for u in data.column("image_uri").to_pylist()]
        pq.write_table(data.set_column(0, "image_uri", pa.array(uris, pa.string())), part)
    fs.put(str(moved), f"{bucket}/run", recursive=True)

    _invoke("report", f"{bucket}/run", "--out", str(tmp_path / "s3.html"), "--per-label", "2")
    page = (tmp_path / "s3.html").read_text()
    assert all(f'<section id="{s}">' in page for s in SECTIONS) and _embedded_pngs(page)
    assert "source image unavailable" not in page and f"{bucket}/inputs/corrupt.jpg" in page

    result = CliRunner().invoke(cli, ["show", f"{bucket}/run", "--out", str(tmp_path / "s3show"), "--sample", "2"])
    assert result.exit_code == 0 and not result.stderr, result.output
    drawn = sorted((tmp_path / "s3show" / "overlays").glob("*.png"))
    assert len(drawn) == 2
    for path in drawn:  # drawn over the real image fetched from the bucket, not over grey
        source = read_source_image(str(inputs / (path.name.rsplit("_", 1)[0] + ".jpg")))
        assert (np.asarray(Image.open(path).convert("RGB")) == source).all(axis=-1).mean() > 0.01


@pytest.mark.skipif(not BROWSER.exists(), reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(label_output, tmp_path):
    report = tmp_path / "report.html"
    _invoke("report", str(label_output), "--out", str(report))
    shot = tmp_path / "shot.png"
    subprocess.run([str(BROWSER_SCRIPT), str(report), str(shot), "1280,2400"], check=True, timeout=120,
                   capture_output=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (2400, 1280, 3)
    # Not blank: the dark header, text, bars and gallery pictures give many colours and contrast.
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 500
    assert (pixels[:40].mean(axis=(0, 1)) < 80).all()  # the header band is drawn (dark), so CSS applied


def test_show_into_a_used_folder_leaves_only_this_runs_overlays(label_output, tmp_path):
    out = tmp_path / "show"
    _invoke("show", str(label_output), "--out", str(out), "--sample", "3")
    assert len(list((out / "overlays").glob("*.png"))) == 3
    _invoke("show", str(label_output), "--out", str(out), "--image", "shapes_000003.jpg")
    assert [path.name for path in (out / "overlays").glob("*.png")] == [
        path.name for path in (out / "overlays").glob("shapes_000003_*.png")] and len(list((out / "overlays").iterdir())) == 1


def test_report_writes_beside_the_output_by_default(label_output, tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    output = _invoke("report", str(label_output), "--per-label", "1", "--gallery-labels", "1")
    beside = label_output.parent / f"{label_output.name}-report.html"
    assert beside.is_file() and str(beside) in output and not list(elsewhere.iterdir())
    beside.unlink()


def test_default_report_file_sits_beside_a_local_output():
    from pipelines.viz.report import default_report_file

    assert default_report_file("runs/a/") == "runs/a-report.html"
    assert default_report_file("file:///data/labels") == "/data/labels-report.html"
    assert default_report_file("s3://bucket/labels/run1/") == "run1-report.html"


@pytest.mark.parametrize("first, second", [("猫", "犬"), ("고양이", "강아지"), ("кошка", "собака"), ("ねこ", "いぬ")])
def test_non_latin_labels_are_drawn_with_their_own_glyphs(first, second):
    """Each label's pixels differ from another label's and from the box of a character no font has (U+E000,
    private use): the characters were drawn, not replaced by empty boxes."""
    rgb = np.full((120, 200, 3), 90, np.uint8)
    mask = np.zeros((120, 200), bool)
    mask[40:100, 20:120] = True

    def label_pixels(label: str) -> np.ndarray:
        drawn = render_overlay(rgb, [DrawnObject(mask=mask, bbox=(20, 40, 100, 60), label=label, score=0.5)])
        return np.asarray(drawn)[40:70, 20:200]

    missing = label_pixels("\ue000" * len(second))
    assert not np.array_equal(label_pixels(first), label_pixels(second))
    assert not np.array_equal(label_pixels(second), missing)
