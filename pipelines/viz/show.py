"""``ovsam-batch show``: overlay PNGs of chosen or sampled images and a contact sheet of them all."""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import posixpath
import re
from collections import defaultdict

from PIL import Image

from ovsam.redaction import redact_uri
from pipelines.viz.overlay import display_shape, objects_from_rows, render_missing_image, render_overlay
from pipelines.viz.reading import AnnotationFilter, LabelOutput, VizError, read_source_image
from pipelines.viz.sheet import Tile, contact_sheet
from schemas.tables import STATUS_OK

OVERLAY_DIR = "overlays"
SHEET_FILE = "contact_sheet.png"
SHEET_CELL_PX = 256
# Overlay file names: the image's stem (unsafe characters replaced) plus a short hash of the full URI,
# so that images with one name in different folders do not overwrite each other.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclasses.dataclass(frozen=True)
class ShowConfig:
    """What to draw. ``images`` (URIs or file names) wins over sampling ``sample`` images by ``seed``."""

    output: str  # prefix written by `ovsam-batch label`, local or fsspec URL
    out_dir: str  # local folder for the PNGs
    images: tuple[str, ...] = ()
    sample: int = 16
    seed: int = 0
    annotation_filter: AnnotationFilter = AnnotationFilter()
    columns: int = 4  # of the contact sheet
    endpoint_url: str | None = None  # S3-compatible endpoint for s3:// outputs and images

    def __post_init__(self) -> None:
        if self.sample < 1:
            raise VizError(f"sample must be at least 1, got {self.sample}")
        if self.columns < 1:
            raise VizError(f"columns must be at least 1, got {self.columns}")


@dataclasses.dataclass(frozen=True)
class ShowResult:
    overlays: list[pathlib.Path]
    sheet: pathlib.Path
    warnings: list[str]  # images that could not be drawn as asked, each with its reason


def overlay_file_name(uri: str) -> str:
    stem = _UNSAFE.sub("_", posixpath.splitext(posixpath.basename(uri))[0]) or "image"
    return f"{stem}_{hashlib.blake2b(uri.encode(), digest_size=4).hexdigest()}.png"


def _count(n: int) -> str:
    return f"{n} object" if n == 1 else f"{n} objects"


def show(config: ShowConfig) -> ShowResult:
    """Draw the chosen images' annotations (those passing the filter) into ``config.out_dir``.

    Writes ``overlays/<name>_<hash>.png`` per image, at the image's size (scaled down when its longer side
    exceeds `overlay.DISPLAY_MAX_SIDE`), and ``contact_sheet.png``. Reads only the chosen images' rows.
    """
    output = LabelOutput(config.output, config.endpoint_url)
    flt = config.annotation_filter
    if config.images:
        uris = output.resolve_images(config.images)
    else:
        uris = sorted(output.sample_images(config.sample, config.seed, flt))  # sheet in file order
        if not uris:
            what = "has no labelled image" if flt.is_everything else "has no annotation that passes the filter"
            raise VizError(f"nothing to show: {output.display} {what}")
    image_rows = output.image_rows(uris)
    by_image: dict[str, list[dict]] = defaultdict(list)
    for row in output.annotations_of(uris, flt).to_pylist():
        by_image[row["image_uri"]].append(row)

    out_dir = pathlib.Path(config.out_dir)
    (out_dir / OVERLAY_DIR).mkdir(parents=True, exist_ok=True)
    # Overlays of an earlier `show` into the same folder would sit beside this one's as if they belonged to it.
    for stale in (out_dir / OVERLAY_DIR).glob("*.png"):
        stale.unlink()
    overlays, tiles, warnings = [], [], []
    for uri in uris:
        info = image_rows.get(uri)
        shown_uri = redact_uri(uri)
        if info is None:
            warnings.append(f"{shown_uri} has annotations but no row in the images table; nothing to draw")
            continue
        if info["status"] != STATUS_OK:
            warnings.append(f"{shown_uri} was not labelled ({info['error_kind']}: {info['error']}); nothing to draw")
            continue
        rows = by_image.get(uri, [])
        size = (info["height"], info["width"])
        objects = objects_from_rows(rows, display_shape(*size))
        try:
            rgb = read_source_image(uri, config.endpoint_url)
            if rgb.shape[:2] != size:
                raise VizError(
                    f"source image is now {rgb.shape[1]}x{rgb.shape[0]} but was labelled at {size[1]}x{size[0]}"
                )
            image = render_overlay(rgb, objects)
        except VizError as err:
            warnings.append(f"{shown_uri}: {err}; masks drawn on a grey background")
            image = render_missing_image(*size, objects, f"source image unavailable: {err}")
        path = out_dir / OVERLAY_DIR / overlay_file_name(uri)
        image.save(path)
        overlays.append(path)
        shown = _count(len(rows)) if flt.is_everything else f"{len(rows)} of {_count(info['num_annotations'])}"
        image.thumbnail((SHEET_CELL_PX, SHEET_CELL_PX), Image.Resampling.LANCZOS)
        tiles.append(Tile(image=image, title=posixpath.basename(shown_uri), subtitle=shown))
    if not tiles:
        raise VizError("none of the chosen images could be drawn: " + "; ".join(warnings))
    sheet = out_dir / SHEET_FILE
    contact_sheet(tiles, config.columns, SHEET_CELL_PX).save(sheet)
    return ShowResult(overlays=overlays, sheet=sheet, warnings=warnings)
